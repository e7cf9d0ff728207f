"""Model layer: the OLMoE-architecture Flax model, expert-dispatch kernels, HF conversion, checkpoints."""
