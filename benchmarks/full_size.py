"""OLMoE-1B-7B at its real size, every stage run as a user runs it, each in its own process.

  python benchmarks/full_size.py --workdir=/tmp/olmoe_full_size            # every stage
  python benchmarks/full_size.py --workdir=/tmp/olmoe_full_size --stages=load,extract,hf

First writes (offline, seeded; reused while its manifest matches) a random-weight checkpoint
with OLMoE-1B-7B-0924's exact config.json and the hub's layout: 3 bfloat16 safetensors shards
of at most 5 GB plus model.safetensors.index.json, per-expert keys, 6,919,161,856 parameters.
Two perturbed copies (the last shard rewritten with mantissa noise, the other files symlinked)
make the 3 checkpoints of the pipeline stage. Then runs the stages, each in a subprocess whose
/proc/<pid>/status is sampled every 20 ms:

  load      moe_grok.model.hf.load_hf(checkpoint, dtype=bfloat16)
  extract   load_hf, then extract_dataset on --batch x --seq random tokens (with the loss), with a
            reused extractor (--repeats timed calls); then the public call as a user makes it,
            extract_dataset(config, params, tokens, batch_size=--batch) without an extractor,
            twice: the second call's tokens/s
  convert   python experiments/convert_checkpoint.py --dtype=bfloat16 (the orbax output)
  restore   moe_grok.model.checkpoint_io.restore_params(the convert output)
  pipeline  python experiments/olmoe_grokking.py over the 3 checkpoints, a small jsonl_ids dataset
  hf        transformers OlmoeModel.from_pretrained(checkpoint, dtype=torch.bfloat16), forward
            of the same batch with router logits
  bad_input load_hf on two broken copies of the checkpoint (the last shard dropped from the
            index; the last shard cut to its first 64 MiB): the error each gives, and how soon
  mesh_memory  per-device memory of the OLMoE-1B-7B bfloat16 extractor on meshes of 1, 8 and 32
            simulated CPU devices (--xla_force_host_platform_device_count), from the compiled
            program's memory_analysis() with abstract (ShapeDtypeStruct) params; 4 samples of
            --mesh_seq tokens per device

For each: wall time, peak RSS (VmHWM, file pages included), peak anonymous memory (RssAnon,
the process's own allocations) and both as ratios to the checkpoint's weight bytes; extract and
hf also report tokens/s of the forward (best of the timed calls, after a first call that
compiles / warms up; the calls' process CPU seconds too, as other work on a shared machine
stretches wall time) and the largest difference of their mean routing weights. Prints a table
and writes <workdir>/full_size.json.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
STAGES = ("load", "extract", "convert", "restore", "pipeline", "hf", "bad_input", "mesh_memory")
# (devices, data, expert) meshes whose per-device memory the mesh_memory stage compiles.
MESHES = ((1, 1, 1), (8, 8, 1), (8, 1, 8), (8, 2, 4), (32, 32, 1), (32, 4, 8), (32, 1, 32))

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/olmoe_full_size", "Checkpoints, data, outputs and full_size.json.")
_STAGES = flags.DEFINE_list("stages", list(STAGES), f"Stages to run, in this order: {','.join(STAGES)}.")
_BATCH = flags.DEFINE_integer("batch", 4, "Samples in the extraction / HF forward batch.")
_SEQ = flags.DEFINE_integer("seq", 128, "Tokens per sample.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed forward calls after the first (compiling / warm-up) one.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights, the batch and the pipeline's data.")
_KEEP_CONVERTED = flags.DEFINE_bool("keep_converted", False, "Keep the convert stage's 13 GB orbax output.")
_MESH_SEQ = flags.DEFINE_integer("mesh_seq", 512, "mesh_memory: tokens per sample.")
_EXPERT_LAYOUT = flags.DEFINE_enum("expert_layout", "per_layer", ["per_layer", "stacked"],
                                   "load / extract: load_hf's expert layout (per_layer: its default).")
_MOE_IMPL = flags.DEFINE_string("moe_impl", "auto", "extract: the expert dispatch (MoEConfig.moe_impl).")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one stage's body in this process.")
_MESH = flags.DEFINE_string("mesh", None, "Internal (mesh_memory child): data x expert, e.g. 4x8.")

# allenai/OLMoE-1B-7B-0924's config.json.
OLMOE_CONFIG = {
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
    "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 50304,
}
MAX_SHARD_BYTES = 5_000_000_000  # transformers' default max_shard_size="5GB", as on the hub
STEPS = (1000, 2000, 3000)  # the checkpoints' names: step<N>
WRITER_VERSION = 1  # bump when the written bytes change


# ----------------------------------------------------------------------------------------
# The checkpoint
# ----------------------------------------------------------------------------------------
def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor in transformers' module order (the order of its shards)."""
    d, f, v, e = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_experts"]
    specs = [("model.embed_tokens.weight", (v, d))]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        specs += [(p + f"self_attn.{name}.weight", (d, d)) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        specs += [(p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,)),
                  (p + "mlp.gate.weight", (e, d))]
        for expert in range(e):
            q = p + f"mlp.experts.{expert}."
            specs += [(q + "gate_proj.weight", (f, d)), (q + "up_proj.weight", (f, d)),
                      (q + "down_proj.weight", (d, f))]
        specs += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
    return specs + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def shard_plan(specs) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors cut into consecutive shards of at most MAX_SHARD_BYTES (bfloat16)."""
    shards, size = [[]], 0
    for key, shape in specs:
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    return shards


def random_bf16_bits(rng: np.random.Generator, shape, is_norm: bool) -> np.ndarray:
    """bfloat16 bit patterns: norms 1.0; weights of random sign and magnitude in [2^-7, 2^-5)
    (std ~0.018, like initializer_range 0.02), drawn from 16 random bits per value (fast)."""
    if is_norm:
        return np.full(shape, 0x3F80, np.uint16)
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    sign, exponent_bit, mantissa = bits & 0x8000, (bits >> 7) & 1, bits & 0x7F
    return sign | ((120 + exponent_bit) << 7) | mantissa  # exponent 120-121: 2^-7 .. 2^-6 (x mantissa)


def write_safetensors(path: str, tensors) -> None:
    """tensors: [(key, shape, fn() -> uint16 bfloat16 bits)], written one at a time."""
    header, offset = {}, 0
    for key, shape, _ in tensors:
        nbytes = 2 * int(np.prod(shape))
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, _, make in tensors:
            f.write(make().tobytes())
    os.replace(tmp, path)


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _key_seed(seed: int, key: str) -> list[int]:
    return [seed, *key.encode()]


def _manifest(directory: str) -> dict:
    return {name: os.path.getsize(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
            if name != "manifest.json"}


def checkpoint_dirs(workdir: str) -> list[str]:
    return [os.path.join(workdir, "checkpoints", f"olmoe-1b-7b-random-step{step}") for step in STEPS]


def write_random_checkpoint(directory: str, config: dict, seed: int, copy: int = 0, base: str | None = None) -> None:
    """A seeded random-weight bfloat16 checkpoint of the OLMoE-style HF `config` in the hub's layout
    (config.json, safetensors shards with an index), written once and reused while its manifest matches.
    copy > 0: a perturbed copy of the checkpoint at `base` (its shards but the last symlinked there, the
    last rewritten with mantissa noise)."""
    manifest_path = os.path.join(directory, "manifest.json")
    wanted = {"writer_version": WRITER_VERSION, "seed": seed, "config": config, "copy": copy}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("spec") == wanted and manifest.get("files") == _manifest(directory):
            return
    specs = tensor_specs(config)
    shards = shard_plan(specs)
    index = {"metadata": {"total_size": sum(2 * int(np.prod(s)) for _, s in specs)},
             "weight_map": {key: _shard_name(i, len(shards)) for i, shard in enumerate(shards) for key, _ in shard}}
    print(f"writing {directory} ...", flush=True)
    started = time.time()
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    for i, shard in enumerate(shards):
        name = _shard_name(i, len(shards))
        if copy and i < len(shards) - 1:  # the copies share every shard but the last with the base
            os.symlink(os.path.join(base, name), os.path.join(directory, name))
            continue

        def make(key, shape):
            bits = random_bf16_bits(np.random.default_rng(_key_seed(seed, key)), shape, key.endswith("norm.weight"))
            if copy:  # mantissa noise: every weight moves by < 2^-4 of itself
                bits ^= np.random.default_rng(_key_seed(seed + copy, key)).integers(0, 8, shape, np.uint16)
            return bits

        write_safetensors(os.path.join(directory, name),
                          [(key, shape, lambda k=key, s=shape: make(k, s)) for key, shape in shard])
    with open(manifest_path, "w") as f:
        json.dump({"spec": wanted, "files": _manifest(directory)}, f, indent=2)
    print(f"  {time.time() - started:.0f} s", flush=True)


def write_checkpoints(workdir: str, seed: int, copies: int = len(STEPS)) -> list[str]:
    """The base OLMoE-1B-7B checkpoint and its perturbed copies, `copies` in all (written once; reused while
    manifests match)."""
    dirs = checkpoint_dirs(workdir)[:copies]
    for copy, directory in enumerate(dirs):
        write_random_checkpoint(directory, OLMOE_CONFIG, seed, copy, base=dirs[0])
    return dirs


def weight_bytes(config: dict) -> int:
    return sum(2 * int(np.prod(shape)) for _, shape in tensor_specs(config))


def batch_tokens(seed: int, batch: int, seq: int) -> np.ndarray:
    return np.random.default_rng([seed, 1]).integers(0, OLMOE_CONFIG["vocab_size"], (batch, seq))


def write_dataset(workdir: str, seed: int, seq: int) -> list[str]:
    """Two domains x 8 samples of `seq` random token ids (jsonl_ids)."""
    paths = []
    rng = np.random.default_rng([seed, 2])
    for domain in ("math", "code"):
        path = os.path.join(workdir, "data", f"{domain}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            for _ in range(8):
                f.write(json.dumps({"input_ids": rng.integers(2, 50000, seq).tolist()}) + "\n")
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------
# Stage bodies (run in the child process)
# ----------------------------------------------------------------------------------------
def _rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def child_load(ckpt: str) -> dict:
    import jax
    import jax.numpy as jnp

    from moe_grok.model.hf import load_hf

    started = time.perf_counter()
    _, params = load_hf(ckpt, dtype=jnp.bfloat16, expert_layout=_EXPERT_LAYOUT.value)
    jax.block_until_ready(params)
    return {"load_s": time.perf_counter() - started, "anon_after_load_bytes": _rss_anon_bytes()}


def child_extract(ckpt: str, workdir: str) -> dict:
    import jax
    import jax.numpy as jnp

    from moe_grok.extraction.routing import extract_dataset, make_extractor
    from moe_grok.model.hf import load_hf

    started = time.perf_counter()
    model_config, params = load_hf(ckpt, dtype=jnp.bfloat16, expert_layout=_EXPERT_LAYOUT.value)
    jax.block_until_ready(params)
    model_config = dataclasses.replace(model_config, moe_impl=_MOE_IMPL.value)
    result = {"load_s": time.perf_counter() - started, "anon_after_load_bytes": _rss_anon_bytes()}
    tokens = batch_tokens(_SEED.value, _BATCH.value, _SEQ.value)
    extractor = make_extractor(model_config)
    times, cpu = [], []
    for _ in range(1 + _REPEATS.value):
        started, started_cpu = time.perf_counter(), time.process_time()
        out = extract_dataset(model_config, params, tokens, batch_size=_BATCH.value, extractor=extractor,
                              progress=False)
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    np.save(os.path.join(workdir, "mean_weights_moe_grok.npy"), out["mean_weights"])
    public = []
    for _ in range(2):  # the public API as a user calls it: no extractor passed
        started = time.perf_counter()
        extract_dataset(model_config, params, tokens, batch_size=_BATCH.value, progress=False)
        public.append(time.perf_counter() - started)
    return {**result, "first_call_s": times[0], "call_s": times[1:], "call_cpu_s": cpu[1:],
            "tokens_per_s": tokens.size / min(times[1:]), "mean_loss": float(out["loss"].mean()),
            "public_call_s": public, "public_second_call_tokens_per_s": tokens.size / public[1],
            "expert_layout": model_config.expert_layout, "moe_impl": model_config.moe_impl}


def child_restore(converted: str) -> dict:
    import jax

    from moe_grok.model.checkpoint_io import restore_params

    started = time.perf_counter()
    _, params = restore_params(converted)
    jax.block_until_ready(params)
    return {"restore_s": time.perf_counter() - started, "anon_after_restore_bytes": _rss_anon_bytes()}


def child_hf(ckpt: str, workdir: str) -> dict:
    import torch
    from transformers import OlmoeModel

    torch.set_num_threads(os.cpu_count())
    started = time.perf_counter()
    model = OlmoeModel.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    result = {"load_s": time.perf_counter() - started, "anon_after_load_bytes": _rss_anon_bytes()}
    tokens = torch.as_tensor(batch_tokens(_SEED.value, _BATCH.value, _SEQ.value))
    times, cpu = [], []
    for _ in range(1 + _REPEATS.value):
        started, started_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = model(input_ids=tokens, output_router_logits=True)
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    b, s = tokens.shape
    probs = torch.stack([torch.softmax(r.float(), -1).reshape(b, s, -1) for r in out.router_logits], 2)
    np.save(os.path.join(workdir, "mean_weights_hf.npy"), probs.mean(1).numpy())
    return {**result, "first_call_s": times[0], "call_s": times[1:], "call_cpu_s": cpu[1:],
            "tokens_per_s": tokens.numel() / min(times[1:])}


def broken_copies(workdir: str, base: str) -> dict[str, str]:
    """Two broken views of the base checkpoint (symlinks, plus one 64 MiB truncated shard)."""
    with open(os.path.join(base, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    dirs = {"shard_missing_from_index": os.path.join(workdir, "broken", "shard_missing_from_index"),
            "truncated_shard": os.path.join(workdir, "broken", "truncated_shard")}
    for kind, directory in dirs.items():
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        os.symlink(os.path.join(base, "config.json"), os.path.join(directory, "config.json"))
        for name in shards[:-1]:
            os.symlink(os.path.join(base, name), os.path.join(directory, name))
        weight_map = index["weight_map"]
        if kind == "shard_missing_from_index":
            weight_map = {k: v for k, v in weight_map.items() if v != shards[-1]}
        else:
            with open(os.path.join(base, shards[-1]), "rb") as src:
                head = src.read(64 << 20)
            with open(os.path.join(directory, shards[-1]), "wb") as dst:
                dst.write(head)
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({**index, "weight_map": weight_map}, f)
    return dirs


def child_bad_input(workdir: str, base: str) -> dict:
    import jax.numpy as jnp

    from moe_grok.model.hf import load_hf

    result = {}
    for kind, directory in broken_copies(workdir, base).items():
        started = time.perf_counter()
        try:
            load_hf(directory, dtype=jnp.bfloat16)
            result[kind] = {"error": None}
        except Exception as err:  # recorded, whatever it is: the point is which error a user sees
            result[kind] = {"error": type(err).__name__, "message": str(err)[:500],
                            "traceback_inside": type(err.__cause__ or err.__context__).__name__
                            if (err.__cause__ or (err.__context__ and not err.__suppress_context__)) else None}
        result[kind]["seconds_to_error"] = time.perf_counter() - started
    return result


def child_mesh_memory(mesh_shape: str) -> dict:
    import jax
    import jax.numpy as jnp

    from moe_grok import sharding
    from moe_grok.extraction.routing import make_extractor
    from moe_grok.model import families
    from moe_grok.model import params as params_lib

    data, expert = (int(n) for n in mesh_shape.split("x"))
    mesh = sharding.make_mesh(data, expert)
    model_config = families.config_from_hf(OLMOE_CONFIG, dtype="bfloat16", expert_layout="per_layer")  # as load_hf
    shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          params_lib.param_shapes(model_config), params_lib.param_shardings(model_config, mesh))
    tokens = jax.ShapeDtypeStruct((4 * mesh.size, _MESH_SEQ.value), jnp.int32,
                                  sharding=sharding.model_batch_sharding(mesh))
    started = time.perf_counter()
    compiled = make_extractor(model_config, mesh).lower(shapes, tokens, tokens, tokens, tokens).compile()
    memory = compiled.memory_analysis()
    sizes = {name: int(getattr(memory, f"{name}_size_in_bytes")) for name in ("argument", "output", "temp", "alias")}
    return {"devices": mesh.size, "data": data, "expert": expert, "batch": [4 * mesh.size, _MESH_SEQ.value],
            "compile_s": time.perf_counter() - started, **{f"{k}_bytes": v for k, v in sizes.items()},
            "per_device_bytes": sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]}


def run_mesh_memory() -> list[dict]:
    """One subprocess per mesh (the simulated device count is fixed when JAX starts)."""
    rows = []
    for devices, data, expert in MESHES:
        env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        command = [sys.executable, os.path.abspath(__file__), "--child=mesh_memory", f"--mesh={data}x{expert}",
                   f"--mesh_seq={_MESH_SEQ.value}"]
        out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"mesh_memory {data}x{expert} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT "):]))
        print(f"  {devices} devices, data {data} x expert {expert}: {_gib(rows[-1]['per_device_bytes'])} GiB "
              "per device", flush=True)
    return rows


def run_child(stage: str) -> None:
    workdir = _WORKDIR.value
    base = checkpoint_dirs(workdir)[0]
    converted = os.path.join(workdir, "converted")
    bodies = {"load": lambda: child_load(base), "extract": lambda: child_extract(base, workdir),
              "restore": lambda: child_restore(converted), "hf": lambda: child_hf(base, workdir),
              "mesh_memory": lambda: child_mesh_memory(_MESH.value),
              "bad_input": lambda: child_bad_input(workdir, base)}
    print("RESULT " + json.dumps(bodies[stage]()), flush=True)


# ----------------------------------------------------------------------------------------
# Measuring a stage's process
# ----------------------------------------------------------------------------------------
def _status_kib(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0])
    return fields


def measure(command: list[str], log_path: str, interval_s: float = 0.02) -> dict:
    """Run `command`, sampling /proc/<pid>/status: wall time, peak RSS (VmHWM), peak RssAnon."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**os.environ, "PYTHONPATH": ROOT})
        peak = {"VmHWM": 0, "RssAnon": 0}
        while process.poll() is None:
            try:
                status = _status_kib(process.pid)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                break
            for name in peak:
                peak[name] = max(peak[name], status.get(name, 0))
            time.sleep(interval_s)
        returncode = process.wait()
    wall = time.perf_counter() - started
    with open(log_path) as f:
        output = f.read()
    result = next((json.loads(line[len("RESULT "):]) for line in output.splitlines() if line.startswith("RESULT ")),
                  {})
    return {"command": " ".join(command), "returncode": returncode, "wall_s": wall,
            "load_average_1min_at_end": os.getloadavg()[0],  # other work on the machine slows every stage
            "peak_rss_bytes": peak["VmHWM"] * 1024, "peak_anon_bytes": peak["RssAnon"] * 1024,
            "output_lines": len(output.splitlines()), "log": log_path, **result}


def stage_command(stage: str, workdir: str, dirs: list[str], data_paths: list[str]) -> list[str]:
    python = sys.executable
    if stage == "convert":
        return [python, "experiments/convert_checkpoint.py", f"--hf_path={dirs[0]}",
                f"--out={os.path.join(workdir, 'converted')}", "--dtype=bfloat16"]
    if stage == "pipeline":
        return [python, "experiments/olmoe_grokking.py", f"--config.checkpoints={','.join(dirs)}",
                "--config.data.format=jsonl_ids", f"--config.data.paths={','.join(data_paths)}",
                f"--config.data.seq_len={_SEQ.value}", f"--config.batch_size={_BATCH.value}",
                f"--config.out_dir={os.path.join(workdir, 'pipeline')}"]
    return [python, os.path.abspath(__file__), f"--child={stage}", f"--workdir={workdir}",
            f"--batch={_BATCH.value}", f"--seq={_SEQ.value}", f"--repeats={_REPEATS.value}", f"--seed={_SEED.value}",
            f"--expert_layout={_EXPERT_LAYOUT.value}", f"--moe_impl={_MOE_IMPL.value}"]


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def print_table(results: dict, weights: int) -> None:
    print(f"\nweights: {weights:,} bytes ({_gib(weights)} GiB bfloat16)")
    print(f"{'stage':<10}{'ok':>4}{'wall s':>9}{'peak RSS GiB':>14}{'x weights':>10}{'peak anon GiB':>15}"
          f"{'x weights':>10}{'tokens/s':>10}")
    for stage, r in results.items():
        tokens = f"{r['tokens_per_s']:.1f}" if "tokens_per_s" in r else ""
        print(f"{stage:<10}{'yes' if r['returncode'] == 0 else 'NO':>4}{r['wall_s']:>9.0f}"
              f"{_gib(r['peak_rss_bytes']):>14}{r['peak_rss_bytes'] / weights:>10.2f}"
              f"{_gib(r['peak_anon_bytes']):>15}{r['peak_anon_bytes'] / weights:>10.2f}{tokens:>10}")
    if "extract" in results and "hf" in results and "tokens_per_s" in results["hf"]:
        hf = results["hf"]["tokens_per_s"]
        speedup = results["extract"]["tokens_per_s"] / hf
        print(f"extraction vs HF bf16 OlmoeModel: {speedup:.2f}x tokens/s (same batch, separate processes, this run)")
        if "public_second_call_tokens_per_s" in results["extract"]:
            public = results["extract"]["public_second_call_tokens_per_s"]
            print(f"public extract_dataset (no extractor passed), second call: {public:.1f} tokens/s, "
                  f"{public / hf:.2f}x HF")


def main(argv):
    del argv
    if _CHILD.value:
        run_child(_CHILD.value)
        return
    unknown = sorted(set(_STAGES.value) - set(STAGES))
    if unknown:
        raise app.UsageError(f"unknown stages {unknown}; choose from {STAGES}")
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    dirs = write_checkpoints(workdir, _SEED.value)
    data_paths = write_dataset(workdir, _SEED.value, _SEQ.value)
    weights = weight_bytes(OLMOE_CONFIG)
    json_path = os.path.join(workdir, "full_size.json")
    results = {}
    mesh_memory = None
    for stage in (s for s in STAGES if s in _STAGES.value):
        if stage == "mesh_memory":
            print("stage mesh_memory ...", flush=True)
            mesh_memory = run_mesh_memory()
            continue
        if stage == "pipeline":
            shutil.rmtree(os.path.join(workdir, "pipeline"), ignore_errors=True)  # no cached stats
        print(f"stage {stage} ...", flush=True)
        results[stage] = measure(stage_command(stage, workdir, dirs, data_paths),
                                 os.path.join(workdir, f"{stage}.log"))
        print(f"  {results[stage]['wall_s']:.0f} s, return code {results[stage]['returncode']}", flush=True)
        if stage == "restore" and not _KEEP_CONVERTED.value:
            shutil.rmtree(os.path.join(workdir, "converted"), ignore_errors=True)
    ours, theirs = (os.path.join(workdir, f"mean_weights_{n}.npy") for n in ("moe_grok", "hf"))
    routing = {}
    if {"extract", "hf"} <= set(results) and os.path.exists(ours) and os.path.exists(theirs):
        diff = np.abs(np.load(ours) - np.load(theirs))
        routing = {"mean_weights_max_abs_diff": float(diff.max()), "mean_weights_mean_abs_diff": float(diff.mean())}
    report = {"date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB",
              "batch": [_BATCH.value, _SEQ.value], "weight_bytes": weights, "stages": results, **routing,
              **({"mesh_memory": mesh_memory} if mesh_memory else {})}
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    print_table(results, weights)
    if routing:
        print(f"mean routing weights, moe_grok vs HF (both bfloat16): max |diff| "
              f"{routing['mean_weights_max_abs_diff']:.2e}")
    if "bad_input" in results:
        for kind in ("shard_missing_from_index", "truncated_shard"):
            r = results["bad_input"].get(kind, {})
            print(f"{kind}: {r.get('error')} after {r.get('seconds_to_error', float('nan')):.1f} s: "
                  f"{(r.get('message') or '')[:200]}")
    if mesh_memory:
        print(f"\nper-device memory of the bfloat16 extractor, 4 x {_MESH_SEQ.value} tokens per device (GiB, "
              f"compiled memory_analysis)")
        print(f"{'devices':>8}{'data':>6}{'expert':>8}{'params':>9}{'temp':>8}{'total':>8}")
        for row in mesh_memory:
            print(f"{row['devices']:>8}{row['data']:>6}{row['expert']:>8}{_gib(row['argument_bytes']):>9}"
                  f"{_gib(row['temp_bytes']):>8}{_gib(row['per_device_bytes']):>8}")
    print(f"wrote {json_path}")


if __name__ == "__main__":
    app.run(main)
