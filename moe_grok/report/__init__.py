"""Report layer: tables, JSON/CSV files and plots of an analysis."""
