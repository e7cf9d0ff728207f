"""OLMoE-1B-7B checkpoint analysis (the paper's main experiment).

Checkpoints are "repo@revision" (hub, needs huggingface_hub), local HF directories or
moe_grok checkpoint directories whose name contains step<N>, or anything with "=<step>"
appended. The paper's steps are 5k,125k,245k,370k,490k,615k,735k,855k,980k,1100k; hub
revisions are named step{S}-tokens{T}B (e.g. step245000-tokens1027B): list them with
huggingface_hub.list_repo_refs("allenai/OLMoE-1B-7B-0924").
"""
import ml_collections

from moe_grok.analysis.options import analysis_config


def get_config():
    config = ml_collections.ConfigDict()
    config.checkpoints = "allenai/OLMoE-1B-7B-0924@step245000-tokens1027B"  # comma-separated specs
    config.dtype = "bfloat16"  # parameter dtype: bfloat16 or float32
    config.moe_impl = "auto"  # expert dispatch: auto (CPU: batched; GPU/TPU: ragged), chunked, batched, ragged, dense
    config.out_dir = "runs/olmoe"  # cache/ (per-checkpoint stats) and report/
    config.plots = True  # draw the report's figures (False: its tables, CSVs and summary only)
    config.mesh = ml_collections.ConfigDict(dict(
        data=-1,  # data-parallel groups (-1: all devices / expert)
        expert=1,  # devices per group splitting the experts, a divisor of num_experts (each also takes a batch share)
    ))
    config.distributed = False  # multi-process (docs/multihost.md): call jax.distributed.initialize() first
    config.cluster = ml_collections.ConfigDict(dict(  # with distributed: the processes (unset: auto-detected)
        coordinator_address="",  # host:port of process 0's coordinator ("": JAX_COORDINATOR_ADDRESS or SLURM/TPU)
        num_processes=-1,  # processes in the run (-1: auto-detected from SLURM / the TPU pod / Open MPI)
        process_id=-1,  # this process's index, 0 = the writer (-1: auto-detected)
        heartbeat_timeout_s=100,  # a process silent this long counts as dead: every other one then stops
        initialization_timeout_s=300,  # how long processes wait for each other to start
    ))
    config.data = ml_collections.ConfigDict(dict(  # moe_grok.data.corpus.load_split reads every key
        format="jsonl_text",  # jsonl_text | jsonl_ids | npy | olmo_memmap
        paths="data/open-web-math.jsonl,data/starcoder.jsonl",  # comma-separated files
        seq_len=512,  # tokens per sample (longer samples are truncated)
        tokenizer="tokenizer.json",  # jsonl_text: a `tokenizers` tokenizer.json (OLMoE's, from the hub repo)
        text_field="text",  # jsonl_text: the record field holding the text
        add_eos=False,  # jsonl_text: append eos_token to every text, as OLMo's data pipeline does
        eos_token="<|endoftext|>",  # jsonl_text: OLMoE's eos token (id 50279)
        add_special_tokens=True,  # jsonl_text: apply the tokenizer's post-processor template
        ids_field="input_ids",  # jsonl_ids: the record field holding token ids
        group_field="",  # jsonl_*: a record field naming each sample's group ("" = use groups_from_files)
        groups_from_files=True,  # jsonl_*: one group per file, named by the file stem
        max_samples_per_group=1000,  # seeded subsample per group (0 = all)
        seed=0,  # subsampling seed
        pad_id=1,  # padding token id (OLMoE's)
        vocab_size=0,  # check token ids < vocab_size while loading (0: checked against the first checkpoint's)
        on_short="drop",  # samples with < 2 tokens: "drop" (logged) or "error"
        lengths="",  # npy: comma-separated lengths .npy files aligned with paths ("" = none)
        file_pad_id=-1,  # npy: trailing id marking padding inside the files (-1 = none)
        memmap_dtype="uint32",  # olmo_memmap: uint16 or uint32 token files
        instance_length=0,  # olmo_memmap: tokens per instance (0 = seq_len)
        instances="",  # olmo_memmap: an .npy instance index ("" = fixed chunks of the stream)
    ))
    config.validation_paths = ""  # held-out files of the same domains (same data settings): validation loss
    # and the held-out control of every metric ("" = none)
    config.test_accuracy_csv = ""  # CSV step,group,accuracy: each domain's test accuracy per checkpoint
    config.test_correctness_csv = ""  # CSV step,group,sample,correct: per-sample test results (Test@ groups,
    # pairing); takes precedence over test_accuracy_csv
    config.train_embeddings = ""  # .npy [train samples, dim] sentence embeddings for pairing ("" = by domain)
    config.test_embeddings = ""  # .npy [test samples, dim], rows in test_correctness_csv's first-appearance order
    config.analysis = analysis_config(max_pairs=5000)  # AnalysisOptions fields (moe_grok.analysis.options)
    config.batch_size = 16  # samples per extraction batch (global; rounded up to a multiple of the mesh's devices)
    return config
