"""Default toy grokking run: modular addition mod 97 with a small 4-layer MoE (CPU, minutes)."""
import ml_collections

from moe_grok.analysis.options import analysis_config


def get_config():
    config = ml_collections.ConfigDict()
    config.task = ml_collections.ConfigDict(dict(
        p=97,  # prime modulus
        ops=("add",),  # operations, one data group each: add, sub, mul, div, x2xyy2
        train_fraction=0.5,  # share of each operation's (a, b) pairs used for training (per op: toy_mixture)
        random_labels=False,  # replace the training answers by seeded random labels (a control)
        seed=0,  # split (and random label) seed
    ))
    config.model = ml_collections.ConfigDict(dict(  # MoEConfig fields over moe_grok.config.toy()
        hidden_size=64,  # model width (the residual stream)
        num_layers=4,  # decoder layers, each with an MoE block
        num_heads=4,  # attention heads
        num_kv_heads=4,  # key/value heads (fewer than num_heads: grouped-query attention)
        head_dim=16,  # width of each attention head
        num_experts=8,  # experts per layer
        num_experts_per_tok=2,  # top-k
        expert_intermediate_size=64,  # SwiGLU width of each expert
        init_std=0.02,  # std of the normal initialization of the weight matrices (the routers too)
        moe_impl="auto",  # expert dispatch: auto (chunked on CPU, ragged on GPU/TPU), chunked, ragged, dense
        expert_chunk_size=512,  # chunked dispatch: most rows in one expert matmul (MoEConfig's default)
        expert_chunk_granule=32,  # chunked dispatch: chunk rows rounded up to a multiple of this (MoEConfig's)
        remat_layers=True,  # gradients recompute each layer's forward: a cheaper step on CPU (docs/benchmarks.md)
        attention_impl="auto",  # auto (on CPU elementwise for these 4-token sequences: faster), matmul, elementwise
    ))
    config.train = ml_collections.ConfigDict(dict(
        steps=2000,  # optimizer steps
        batch_size=512,  # minibatch (a pure function of (seed, step): exact resume)
        learning_rate=2e-3,  # AdamW peak learning rate
        warmup_steps=50,  # linear warmup, then constant (or the cosine decay below)
        cosine_decay_steps=0,  # 0: constant learning rate after warmup; > warmup_steps: cosine decay to 0 at this step
        weight_decay=1.0,  # AdamW decoupled weight decay
        b1=0.9, b2=0.98,  # Adam betas
        adam_eps=1e-8,  # Adam epsilon
        grad_clip_norm=1.0,  # clip gradients to this global norm (0 = no clipping)
        router_weight_decay=True,  # apply weight decay to the routers too
        aux_loss_coef=0.01,  # load-balancing loss weight
        z_loss_coef=0.0,  # router z-loss weight
        label_smoothing=0.0,  # answer labels smoothed toward uniform by this share (0 = plain cross-entropy)
        seed=0,  # init and minibatch seed
        eval_every=100,  # steps between evaluations (metrics.jsonl)
        checkpoint_every=100,  # steps between params checkpoints (the analysed "pretraining checkpoints")
        eval_batch_size=1024,  # rows per evaluation batch; = analysis.batch_size: the analysis reuses the evaluation
    ))
    config.monitor = ml_collections.ConfigDict(dict(
        enabled=True,  # pathway monitor at each evaluation: metrics.jsonl, history <workdir>/monitor (docs/monitor.md)
    ))
    config.analysis = analysis_config()
    config.analysis.batch_size = 1024  # samples per extraction batch (= train.eval_batch_size: see there)
    config.analysis.train_embeddings = ""  # .npy [train samples, dim] embeddings for pairing ("" = by domain)
    config.analysis.test_embeddings = ""  # .npy [test-split samples, dim] (tasks.evaluation_splits; "" = by domain)
    config.analysis.pairing_embedding = ""  # "operands": pair groups by tasks.operand_embeddings (no files)
    config.analysis.held_out_split = "validation"  # held-out control of every metric: "validation" or "test" split
    return config
