"""A monitor of memorization-to-generalization for any MoE training run (docs/monitor.md)."""
from moe_grok.monitor.pathway_monitor import PathwayMonitor, report_from_history
from moe_grok.monitor.probes import ProbeSet

__all__ = ["PathwayMonitor", "ProbeSet", "report_from_history"]
