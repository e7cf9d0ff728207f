"""Model layer: the Flax MoE decoder (OLMoE, Qwen3-MoE), expert dispatch, HF conversion by family, checkpoints."""
