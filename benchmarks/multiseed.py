"""Wall time of S seeds trained together divided by 1 seed, same steps, same process.

  python benchmarks/multiseed.py                      # default toy config, 8 seeds, 100 steps
  python benchmarks/multiseed.py --steps=200 --rounds=2 --compare_vmap

Both sides are full `training` runs into fresh workdirs (steps, evaluations, checkpoints),
after one warm-up run that compiles the step; rounds alternate 1-seed and S-seed runs and the
medians are compared. --compare_vmap also times one optimizer step of the S seeds as one
jax.vmap program over stacked params (with the config's expert dispatch and with the dense
one), against the one-thread-per-seed dispatch that `training` uses, one seed alone, and all seeds
dispatched from one thread, and checks whether each vmapped program's first step (from the
initial state) equals the single-seed steps bit for bit. Under `taskset -c 0` it measures what
one core does, the bound on what seeds sharing the cores can gain.
"""
import concurrent.futures
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from moe_grok import configs
from moe_grok.data import tasks
from moe_grok.model import params as params_lib
from moe_grok.studies import launch
from moe_grok.training import loop, multiseed
from moe_grok.training import step as step_lib
from moe_grok.training.optimizer import make_optimizer
from moe_grok.training.run_config import model_config_of, task_spec

_CONFIG = config_flags.DEFINE_config_file(
    "config", configs.path("toy_grokking"), "Toy run config.")
_SEEDS = flags.DEFINE_integer("seeds", 8, "Seeds trained together.")
_STEPS = flags.DEFINE_integer("steps", 100, "Optimizer steps of every timed run.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Alternating (1 seed, S seeds) rounds; medians are compared.")
_COMPARE_VMAP = flags.DEFINE_bool("compare_vmap", False, "Also time a jax.vmap step over stacked seeds.")


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _median_seconds(run_once, repeats: int = 3) -> float:
    run_once()  # compiles
    return statistics.median(_timed(run_once) for _ in range(repeats))


def _bitwise_equal(vmapped_out, seed_outs: list) -> bool:
    """Whether seed s's slice of the vmapped step's (params, optimizer state, metrics) equals the
    single-seed step's, bit for bit (the optimizer state holds the gradients' moments: at step 0
    the warmup's learning rate is 0, and the params alone would not show a gradient difference)."""
    return all(bool(jnp.array_equal(stacked[s], alone)) for s, out in enumerate(seed_outs)
               for stacked, alone in zip(jax.tree.leaves(vmapped_out), jax.tree.leaves(out), strict=True))


def _step_times(config, seeds: int) -> tuple[dict[str, float], dict[str, bool]]:
    """Seconds per optimizer step: one seed; all seeds as training runs them (the compiled
    single-seed step, one thread per seed); the same from one thread; and one jax.vmap program
    over stacked seeds, with the config's expert dispatch and with the dense one. Also whether
    each vmapped program's first step equals the single-seed steps bit for bit (per dispatch)."""
    spec = task_spec(config)
    data = tasks.make_dataset(spec)
    n_train = len(data.train_targets)
    batches = [step_lib.batch_indices(s, 0, n_train, config.train.batch_size) for s in range(seeds)]
    batches = [(jnp.asarray(data.train_inputs[i]), jnp.asarray(data.train_targets[i])) for i in batches]
    stacked_batch = tuple(jnp.stack([b[k] for b in batches]) for k in range(2))
    tx = make_optimizer(config.train)
    times, bitwise = {}, {}
    pool = concurrent.futures.ThreadPoolExecutor(seeds)
    options = step_lib.train_step_compiler_options(jax.devices()[0].platform)
    for impl in (config.model.moe_impl, "dense"):
        model_config = model_config_of(config, spec).replace(moe_impl=impl)
        step = step_lib.step_function(model_config, tx, config.train.aux_loss_coef, config.train.z_loss_coef,
                                  config.train.label_smoothing)
        params = [params_lib.init_params(model_config, jax.random.key(s)) for s in range(seeds)]
        state = {"seeds": [(p, tx.init(p)) for p in params]}
        state["stacked"] = jax.tree.map(lambda *a: jnp.stack(a), *state["seeds"])
        single, vmapped = jax.jit(step, compiler_options=options), jax.jit(jax.vmap(step), compiler_options=options)
        bitwise[impl] = _bitwise_equal(vmapped(*state["stacked"], *stacked_batch),
                                       [single(p, o, *b) for (p, o), b in zip(state["seeds"], batches, strict=True)])

        def advance(s, single=single, state=state):
            p, o, _ = jax.block_until_ready(single(*state["seeds"][s], *batches[s]))
            state["seeds"][s] = p, o

        def one_thread(single=single, state=state):
            out = [single(p, o, *b) for (p, o), b in zip(state["seeds"], batches, strict=True)]
            state["seeds"] = [(p, o) for p, o, _ in jax.block_until_ready(out)]

        def one_program(vmapped=vmapped, state=state):
            p, o, _ = jax.block_until_ready(vmapped(*state["stacked"], *stacked_batch))
            state["stacked"] = p, o

        if impl == config.model.moe_impl:
            times[f"1 seed ({impl})"] = _median_seconds(lambda advance=advance: advance(0))
            times[f"one thread per seed ({impl}), what training does"] = _median_seconds(
                lambda advance=advance: list(pool.map(advance, range(seeds))))
            times[f"all seeds from one thread ({impl})"] = _median_seconds(one_thread)
        times[f"vmap ({impl})"] = _median_seconds(one_program)
    pool.shutdown()
    return times, bitwise


def main(argv):
    del argv
    launch.quiet_logs()
    config = _CONFIG.value
    config.train.steps = _STEPS.value
    seeds = list(range(_SEEDS.value))
    with tempfile.TemporaryDirectory() as root:
        warmup = config.copy_and_resolve_references()
        warmup.train.steps = min(config.train.steps, config.train.eval_every)  # enough to compile step and evaluation
        loop.train(warmup, os.path.join(root, "warmup"), progress=False)
        one, many = [], []
        for r in range(_ROUNDS.value):
            one.append(_timed(lambda r=r: loop.train(config, os.path.join(root, f"one_{r}"), progress=False)))
            many.append(_timed(lambda r=r: multiseed.train(config, os.path.join(root, f"many_{r}"), seeds,
                                                           progress=False)))
    t_one, t_many = statistics.median(one), statistics.median(many)
    print(f"config: {dict(config.model)} batch {config.train.batch_size}, {_STEPS.value} steps, eval/checkpoint "
          f"every {config.train.eval_every}/{config.train.checkpoint_every}; jax {jax.__version__}, "
          f"{os.cpu_count()} CPUs")
    print(f"1 seed: {t_one:.1f} s (rounds {[round(t, 1) for t in one]})")
    print(f"{len(seeds)} seeds together: {t_many:.1f} s (rounds {[round(t, 1) for t in many]})")
    print(f"ratio {len(seeds)} seeds / 1 seed: {t_many / t_one:.2f}x (per seed: {t_many / t_one / len(seeds):.2f}x)")
    if _COMPARE_VMAP.value:
        times, bitwise = _step_times(config, len(seeds))
        reference = times[f"one thread per seed ({config.model.moe_impl}), what training does"]
        for name, seconds in times.items():
            print(f"one optimizer step, {name}: {seconds * 1e3:.0f} ms ({seconds / reference:.2f}x training's)")
        for impl, equal in bitwise.items():
            print(f"vmap ({impl}) step bitwise equal to the single-seed steps, every seed: {equal}")


if __name__ == "__main__":
    app.run(main)
