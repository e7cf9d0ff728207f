"""Default toy grokking run: modular addition mod 97 (40% of pairs for training) with a small
4-layer MoE, 8 experts top-2 (CPU, minutes). With seed 0, train accuracy passes 0.9 at step
200; test accuracy stays below 0.5 until step 800 and passes 0.9 at step 1100. Other seeds
grok later or not within 2,000 steps (README, toy grokking reproduction)."""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.task = ml_collections.ConfigDict(dict(p=97, ops=("add",), train_fraction=0.4, seed=0))
    config.model = ml_collections.ConfigDict(dict(
        hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=16,
        num_experts=8, num_experts_per_tok=2, expert_intermediate_size=64))
    config.train = ml_collections.ConfigDict(dict(
        steps=2000, batch_size=512, learning_rate=2e-3, warmup_steps=10, weight_decay=1.0,
        b1=0.9, b2=0.98, aux_loss_coef=0.01, z_loss_coef=0.0, seed=0,
        eval_every=100, checkpoint_every=100))
    config.analysis = ml_collections.ConfigDict(dict(
        tau=0.7, delta=0.05, target_fraction=(0.20, 0.25), distance_level="char",
        max_pairs=2000, batch_size=1024))
    return config
