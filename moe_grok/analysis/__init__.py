"""Analysis layer: checkpoint sources and cached stats, pathway metrics, memorization / grokking rules."""
