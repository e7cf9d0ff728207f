"""Data layer (numpy only): evaluation splits, text/token corpora by domain, algorithmic tasks."""
