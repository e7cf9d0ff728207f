"""Checkpoints layer: where checkpoints come from, their cached per-checkpoint statistics, and the user's
test-correctness CSVs."""
