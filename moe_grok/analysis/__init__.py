"""Analysis layer: pure array math over per-checkpoint statistics: pathways, metrics, grokking rules, statistics, the report dict."""
