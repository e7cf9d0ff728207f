"""A monitor of memorization-to-generalization for any MoE training run (docs/monitor.md), and the
adapters that read routing from Hugging Face and Flax models (docs/integrations.md)."""
from moe_grok.monitor.flax_routing import router_matrices_from_flax, routing_from_flax
from moe_grok.monitor.hf_routing import (
                                         UnsupportedRouterError,
                                         per_sample_loss_from_hf,
                                         router_matrices_from_hf,
                                         routing_from_hf,
)
from moe_grok.monitor.pathway_monitor import PathwayMonitor, report_from_history
from moe_grok.monitor.probes import ProbeSet

__all__ = ["PathwayMonitor", "ProbeSet", "UnsupportedRouterError", "per_sample_loss_from_hf", "report_from_history",
           "router_matrices_from_flax", "router_matrices_from_hf", "routing_from_flax", "routing_from_hf"]
