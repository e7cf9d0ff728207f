"""Toy-model training: the resumable loop (`loop`, `multiseed`) and its periodic callbacks (`callbacks`:
evaluation, metrics log, checkpoints, and the caller's own)."""
