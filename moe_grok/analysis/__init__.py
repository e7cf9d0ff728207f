"""Analysis layer: pure array math over per-checkpoint statistics (pathways, metrics, grokking rules,
statistics) and the report dict built from them."""
