"""Checkpoints layer: where checkpoints come from, their cached per-checkpoint statistics, a run's compact
artifact of them (run_artifact), and the user's test-correctness CSVs."""
