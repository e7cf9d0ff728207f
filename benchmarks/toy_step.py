"""Where one toy optimizer step's time goes: forward, gradient and full step, and a profile of
the step's XLA operations by model part.

  python benchmarks/toy_step.py                    # default toy config
  python benchmarks/toy_step.py --rounds=5 --config.model.expert_chunk_size=1024
  python benchmarks/toy_step.py --profile_vmap     # also profile a jax.vmap step over 8 stacked seeds

The optimizer step is compiled as `training` compiles it (remat_layers as configured, the CPU
compiler options of `training.step.train_step_compiler_options`, the attention form `attention_impl` picks);
the same step is also timed with each of those settings left out, and without the first two, so one
run shows what each is worth. Every step setting is timed twice: one seed alone, and
--seed_threads seeds' steps each in its own thread, as multi-seed training runs them (there the
seeds compete for the cores, and a setting can be worth more than it is to one seed alone).

Each time is the mean of --repeats calls, then the median over interleaved rounds (every timed
call in turn), so a drift of the machine's speed hits them all alike. The profile
(jax.profiler, one trace of --profiled steps) sums the XLA CPU runtime's per-operation events
by the model part named in each operation's metadata: attention, MoE (router, dispatch,
experts), norms, the rest; forward and backward apart. Operations inside the expert-dispatch
loops carry no metadata of their own and are counted as "loop bodies". A profiled step runs
slower than an unprofiled one: read the profile's shares, not its milliseconds. The step's matmul
FLOPs are counted by arithmetic (XLA's cost analysis counts each loop body once). --profile_vmap
profiles one jax.vmap program over the --seed_threads seeds' stacked state the same way and puts
each part beside one seed's: a part below --seed_threads times one seed's is work the seeds share.
"""
import collections
import concurrent.futures
import dataclasses
import functools
import glob
import gzip
import json
import os
import re
import statistics
import tempfile

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from moe_grok import configs
from moe_grok.data import tasks
from moe_grok.model import dispatch, layers
from moe_grok.model import params as params_lib
from moe_grok.studies import launch
from moe_grok.training import step as step_lib
from moe_grok.training.optimizer import make_optimizer
from moe_grok.training.run_config import model_config_of, task_spec

import timing  # benchmarks/timing.py

_CONFIG = config_flags.DEFINE_config_file(
    "config", configs.path("toy_grokking"), "Toy run config.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Calls per timed function per round (their mean is the round's time).")
_PROFILED = flags.DEFINE_integer("profiled", 5, "Steps in the profile (0 = no profile).")
_SEED_THREADS = flags.DEFINE_integer("seed_threads", 8, "Seeds stepped in threads, as training does (0 = not timed).")
_PROFILE_VMAP = flags.DEFINE_bool("profile_vmap", False, "Also profile one jax.vmap step over the --seed_threads "
                                  "seeds' stacked state, by model part beside one seed's step.")

_RUNTIME_EVENTS = ("ThunkExecutor", "$", "PjitFunction", "SlinkyThreadPool")  # runtime and Python frames, not ops


def _part(op_name: str) -> str:
    direction = "backward" if "transpose(" in op_name else "forward"
    for part, marker in (("attention", "/attn"), ("MoE", "/moe"), ("norms", "norm")):
        if marker in op_name:
            return f"{direction} {part}"
    if "jvp(" not in op_name and "transpose(" not in op_name:
        return "optimizer update"
    return f"{direction} other"


def _op_metadata(compiled_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata."""
    metadata = {}
    for line in compiled_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]+)\"", line)
        if match:
            metadata[match.group(1)] = match.group(2)
    return metadata


def _profile(step, args, steps: int, metadata: dict[str, str]) -> tuple[collections.Counter, int]:
    """(milliseconds per step by model part, operations per step) from a jax.profiler trace."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                jax.block_until_ready(step(*args))
        (trace_file,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(trace_file) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    parts, count = collections.Counter(), 0
    for event in events:
        name = event["name"]
        if name.startswith(_RUNTIME_EVENTS) or name.startswith("while"):  # a while event spans its body's ops
            continue
        count += 1
        parts[_part(metadata[name]) if name in metadata else "loop bodies (expert dispatch)"] += event["dur"] / 1e3
    return collections.Counter({k: v / steps for k, v in parts.items()}), count // steps


def _matmul_flops_per_step(model_config, batch: int, seq: int) -> float:
    """Matmul FLOPs of one optimizer step, by arithmetic: the forward; with remat_layers every
    layer's forward again; the backward (twice the forward); with the chunked dispatch the
    experts' forward a third time (each chunk's VJP recomputes it). XLA's cost analysis counts
    every loop body once (the layer scan, the dispatch loops), so it cannot give this."""
    c = model_config
    width = (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim  # q, o; k, v
    attention = 2 * c.hidden_size * width + 2 * 2 * seq * c.num_heads * c.head_dim  # projections; scores, values
    experts = c.num_experts_per_tok * 3 * 2 * c.hidden_size * c.expert_intermediate_size
    layer = attention + 2 * c.hidden_size * c.num_experts + experts  # + router
    forward = c.num_layers * layer + 2 * c.hidden_size * c.vocab_size  # + LM head
    total = 3 * forward + (c.num_layers * layer if c.remat_layers else 0)
    if dispatch.resolve_moe_impl(c.moe_impl) == "chunked":
        total += c.num_layers * experts
    return total * batch * seq


def main(argv):
    del argv
    launch.quiet_logs()
    config = _CONFIG.value
    spec = task_spec(config)
    data = tasks.make_dataset(spec)
    batch = step_lib.batch_indices(config.train.seed, 0, len(data.train_targets), config.train.batch_size)
    inputs, answers = jnp.asarray(data.train_inputs[batch]), jnp.asarray(data.train_targets[batch])
    model_config = model_config_of(config, spec)
    params = params_lib.init_params(model_config, jax.random.key(config.train.seed))
    tx = make_optimizer(config.train)
    opt_state = tx.init(params)
    train = config.train

    def loss(p):
        return step_lib.loss_fn(p, model_config, inputs, answers, train.aux_loss_coef, train.z_loss_coef,
                            train.label_smoothing)[0]

    def optimizer_step(remat_layers: bool, compiler_options, attention_impl: str):
        step_config = dataclasses.replace(model_config, remat_layers=remat_layers, attention_impl=attention_impl)
        return jax.jit(step_lib.step_function(step_config, tx, train.aux_loss_coef, train.z_loss_coef,
                                          train.label_smoothing), compiler_options=compiler_options)

    forward, gradient = jax.jit(loss), jax.jit(jax.grad(loss))
    options = step_lib.train_step_compiler_options(jax.devices()[0].platform)
    # The step as `training` compiles it (without donation), then with each of its three CPU speed
    # settings left out, then without the first two ("either": remat_layers, compiler options).
    remat, attention = model_config.remat_layers, model_config.attention_impl
    settings = {"optimizer step": (remat, options, attention)}
    if options:
        settings["optimizer step, without the CPU compiler options"] = (remat, None, attention)
    if remat:
        settings["optimizer step, without remat_layers"] = (False, options, attention)
    if options and remat:
        settings["optimizer step, without either"] = (False, None, attention)
    if layers.resolve_attention_impl(attention, inputs.shape[1]) == "elementwise":
        settings["optimizer step, with matmul attention"] = (remat, options, "matmul")
    steps = {name: optimizer_step(*setting) for name, setting in settings.items()}
    step = steps["optimizer step"]  # the profiled one
    calls = {"forward (loss)": lambda: forward(params), "gradient": lambda: gradient(params),
             **{name: functools.partial(s, params, opt_state, inputs, answers) for name, s in steps.items()}}
    if _SEED_THREADS.value:
        pool = concurrent.futures.ThreadPoolExecutor(_SEED_THREADS.value)
        seed_args = []
        for seed in range(_SEED_THREADS.value):
            rows = step_lib.batch_indices(seed, 0, len(data.train_targets), config.train.batch_size)
            seed_params = params_lib.init_params(model_config, jax.random.key(seed))
            seed_args.append((seed_params, tx.init(seed_params), jnp.asarray(data.train_inputs[rows]),
                              jnp.asarray(data.train_targets[rows])))
        for name, s in steps.items():
            calls[f"{name}, {_SEED_THREADS.value} seeds in threads"] = functools.partial(
                lambda s: list(pool.map(lambda args: jax.block_until_ready(s(*args)), seed_args)), s)
    for call in calls.values():
        jax.block_until_ready(call())  # compiles

    def repeated(call):
        return lambda: [jax.block_until_ready(call()) for _ in range(_REPEATS.value)]

    rounds = timing.interleaved_times({name: repeated(call) for name, call in calls.items()}, _ROUNDS.value,
                                      settle_s=0.2)
    if _SEED_THREADS.value:
        pool.shutdown()
    print(f"config: {dict(config.model)}, batch {inputs.shape}; jax {jax.__version__}, {os.cpu_count()} CPUs")
    for name, seconds in rounds.items():
        per_call = seconds / _REPEATS.value * 1e3
        print(f"{name}: {statistics.median(per_call):.1f} ms (per round {[round(float(t), 1) for t in per_call]})")
    if _PROFILED.value:
        compiled = step.lower(params, opt_state, inputs, answers).compile()
        parts, ops = _profile(step, (params, opt_state, inputs, answers), _PROFILED.value,
                              _op_metadata(compiled.as_text()))
        total = sum(parts.values())
        flops = _matmul_flops_per_step(model_config, *inputs.shape)
        step_ms = statistics.median(rounds["optimizer step"]) / _REPEATS.value * 1e3
        print(f"matmul FLOPs per step (arithmetic): {flops / 1e9:.2f} GFLOP, {flops / step_ms / 1e6:.0f} GFLOP/s "
              f"at {step_ms:.1f} ms (XLA's cost analysis, each loop body once: "
              f"{compiled.cost_analysis().get('flops', float('nan')) / 1e9:.2f} GFLOP)")
        print(f"profile: {ops} XLA operations per step, {total:.1f} ms of operation time per profiled step")
        for part, ms in parts.most_common():
            print(f"  {part}: {ms:.1f} ms ({ms / total:.0%})")
        if _PROFILE_VMAP.value and _SEED_THREADS.value:
            stacked = jax.tree.map(lambda *a: jnp.stack(a), *seed_args)
            vmapped = jax.jit(jax.vmap(step_lib.step_function(model_config, tx, train.aux_loss_coef,
                                                          train.z_loss_coef, train.label_smoothing)),
                              compiler_options=options)
            v_parts, v_ops = _profile(vmapped, stacked, _PROFILED.value,
                                      _op_metadata(vmapped.lower(*stacked).compile().as_text()))
            seeds = _SEED_THREADS.value
            print(f"profile of one jax.vmap step over {seeds} stacked seeds: {v_ops} XLA operations, "
                  f"{sum(v_parts.values()):.1f} ms of operation time ({sum(v_parts.values()) / total:.1f}x one seed's; "
                  f"below {seeds}x where the seeds share work)")
            for part, ms in v_parts.most_common():
                print(f"  {part}: {ms:.1f} ms ({ms / max(parts[part], 1e-9):.1f}x one seed's)")


if __name__ == "__main__":
    app.run(main)
