"""OLMoE-1B-7B checkpoint analysis (the paper's main experiment).

Checkpoints are "repo@revision" (hub, needs huggingface_hub), local HF directories whose
name contains step<N>, or anything with "=<step>" appended. The paper's steps are
5k,125k,245k,370k,490k,615k,735k,855k,980k,1100k; hub revisions are named
step{S}-tokens{T}B (e.g. step245000-tokens1027B) — list them with
huggingface_hub.list_repo_refs("allenai/OLMoE-1B-7B-0924") and fill `checkpoints`.
"""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.checkpoints = "allenai/OLMoE-1B-7B-0924@step245000-tokens1027B"  # comma-separated
    config.dtype = "bfloat16"
    config.out_dir = "runs/olmoe"
    config.batch_size = 16  # global batch; rounded up to a multiple of the mesh's data axis
    config.mesh = ml_collections.ConfigDict(dict(data=-1, expert=1))  # data=-1: all devices / expert
    config.distributed = False  # multi-host: call jax.distributed.initialize() first
    config.data = ml_collections.ConfigDict(dict(
        format="jsonl_text",  # jsonl_text | jsonl_ids | npy | olmo_memmap
        paths="data/open-web-math.jsonl,data/starcoder.jsonl",  # comma-separated
        tokenizer="tokenizer.json",  # jsonl_text only (OLMoE's tokenizer.json from the hub repo)
        groups_from_files=True,  # one group per file; or set group_field
        group_field="",
        seq_len=512,
        max_samples_per_group=1000,
        seed=0,
        memmap_dtype="uint32",  # olmo_memmap only
    ))
    config.test_accuracy_csv = ""  # optional CSV step,group,accuracy for correlations and delays
    config.analysis = ml_collections.ConfigDict(dict(
        tau=0.7, delta=0.05, target_fraction=(0.20, 0.25), distance_level="char", max_pairs=5000))
    return config
