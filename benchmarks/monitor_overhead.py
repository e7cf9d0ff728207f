"""The pathway monitor's overhead on a toy training run: the same run trained with and without the
monitor callback (`config.monitor.enabled`), in one process, in interleaved rounds.

  python benchmarks/monitor_overhead.py                       # default toy config, its 2000 steps
  python benchmarks/monitor_overhead.py --steps=1000 --rounds=2

Both sides run the toy run's own callbacks (`toy_run.training_callbacks`: the analysis cache writer,
and on the "monitored" side the monitor at the evaluation cadence, `config.train.eval_every`), each
round into fresh workdirs (rounds alternate the order: plain first, then monitored first), after a
warm-up run of each side that compiles the step, the evaluation and the monitor's consistency.
Prints each side's wall and process CPU times, the monitor's own time per update
(its callback, history writes included) and its share of the plain run's time, and the ratio of
the median wall times; the goal is <= 1.05. On a loaded machine the ratio is noise-bound; the
monitor's own time is measured directly.
"""
import tempfile
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from moe_grok import configs
from moe_grok.monitor.training_callback import MonitorCallback
from moe_grok.studies import launch, toy_run
from moe_grok.training import loop

GOAL = 1.05
SIDES = ("plain", "monitored")
_CONFIG = config_flags.DEFINE_config_file(
    "config", configs.path("toy_grokking"), "Toy run config.")
_STEPS = flags.DEFINE_integer("steps", None, "Optimizer steps of each run (default: the config's).")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Interleaved rounds (one run of each side per round).")


def main(argv):
    del argv
    launch.quiet_logs()
    config = _CONFIG.value
    if _STEPS.value is not None:
        config.train.steps = _STEPS.value
    configs = {}
    for name, enabled in zip(SIDES, (False, True), strict=True):
        configs[name] = config.copy_and_resolve_references()
        configs[name].monitor.enabled = enabled
    update_seconds = []
    on_step = MonitorCallback.on_step

    def timed_on_step(self, state):
        started = time.perf_counter()
        on_step(self, state)
        update_seconds.append(time.perf_counter() - started)

    MonitorCallback.on_step = timed_on_step
    with tempfile.TemporaryDirectory() as root:
        def train(name: str, steps: int | None = None):
            run_config = configs[name].copy_and_resolve_references()
            if steps is not None:
                run_config.train.steps = steps
            loop.train(run_config, tempfile.mkdtemp(dir=root, prefix=name), progress=False,
                       callbacks=toy_run.training_callbacks(run_config))

        for name in configs:  # warm-up: compiles what both sides run
            train(name, steps=1)
        update_seconds.clear()
        times = {name: [] for name in configs}
        cpu_times = {name: [] for name in configs}
        for round_index in range(_ROUNDS.value):
            # ABBA order: a machine whose load drifts during the run slows both sides alike.
            for name in (SIDES if round_index % 2 == 0 else SIDES[::-1]):
                wall, cpu = time.perf_counter(), time.process_time()
                train(name)
                times[name].append(time.perf_counter() - wall)
                cpu_times[name].append(time.process_time() - cpu)
                time.sleep(1.0)
    median = {name: float(np.median(t)) for name, t in times.items()}
    cpu_median = {name: float(np.median(t)) for name, t in cpu_times.items()}
    train_config = config.train
    print(f"{train_config.steps} steps, evaluations every {train_config.eval_every} "
          f"({len(update_seconds) // _ROUNDS.value} monitor updates per run), {_ROUNDS.value} round(s)")
    for name in SIDES:
        print(f"  {name:9s} wall {', '.join(f'{s:.1f}' for s in times[name])} s (median {median[name]:.1f}); "
              f"CPU {', '.join(f'{s:.1f}' for s in cpu_times[name])} s (median {cpu_median[name]:.1f})")
    update_ms = 1000 * np.asarray(update_seconds)
    print(f"  monitor update: median {np.median(update_ms):.0f} ms, max {np.max(update_ms):.0f} ms")
    per_run = float(np.sum(update_seconds)) / _ROUNDS.value
    print(f"  monitor's own time per run: {per_run:.1f} s = {per_run / median['plain']:.1%} of the plain run")
    ratio = median["monitored"] / median["plain"]
    print(f"monitored / plain: wall {ratio:.3f}x (goal <= {GOAL}), "
          f"CPU {cpu_median['monitored'] / cpu_median['plain']:.3f}x")


if __name__ == "__main__":
    app.run(main)
