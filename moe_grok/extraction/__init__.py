"""Extraction layer: one forward pass gives per-sample routing, loss and correctness; pathways from routing."""
