"""Model layer: the Flax MoE decoder (OLMoE, Qwen3-MoE), expert-dispatch kernels, HF conversion by model family, checkpoints."""
