"""moe_grok: grokking detection in Mixture-of-Experts models via routing pathways."""
