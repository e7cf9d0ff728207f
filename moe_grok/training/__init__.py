"""Toy-model training: losses, the resumable training loop."""
