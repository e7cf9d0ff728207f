"""moe_grok: grokking detection in Mixture-of-Experts models via routing pathways."""
from moe_grok.config import MoEConfig, olmoe_1b_7b, olmoe_small, toy
from moe_grok.convert import CheckpointError, load_hf, restore_params, save_params
from moe_grok.extraction import extract_dataset, make_extractor
from moe_grok.model import forward, init_params, router_matrices

__all__ = ["MoEConfig", "olmoe_1b_7b", "olmoe_small", "toy", "CheckpointError", "load_hf", "restore_params",
           "save_params", "extract_dataset", "make_extractor", "forward", "init_params", "router_matrices"]
