"""Training + analysis of one protocol arm: the analysis extracting every checkpoint itself vs
training handing its evaluations to the analysis cache (`toy_run.analysis_cache_callbacks`).

  python benchmarks/analysis_reuse.py                       # default toy config, 4 seeds, 300 steps
  python benchmarks/analysis_reuse.py --config=moe_grok/configs/toy_mixture.py --seeds=8

Both sides train the same seeds from scratch into fresh workdirs (multiseed.train, evaluations and
checkpoints every 100 steps), after one warm-up that compiles the step, the evaluation and the
analysis' extractor. Then each side's seeds are analysed as the protocol does (protocol.analyse_arm:
seeds in threads, both routing views), in interleaved rounds; before each round the reports are
removed, and on the "extracts" side its cache too. Checks that the two sides' results are identical
and that the "handed" side loads every checkpoint from the cache; prints each side's training time,
its analysis times and the ratio of the median analysis times and of training + median analysis.
"""
import json
import os
import shutil
import statistics
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from moe_grok import configs
from moe_grok.studies import launch, protocol, toy_run
from moe_grok.training import multiseed
from moe_grok.training.checkpointing import RunCheckpoints

SIDES = ("extracts", "handed")

_CONFIG = config_flags.DEFINE_config_file(
    "config", configs.path("toy_grokking"), "Toy run config.")
_SEEDS = flags.DEFINE_integer("seeds", 4, "Seeds trained together.")
_STEPS = flags.DEFINE_integer("steps", 300, "Optimizer steps of each side.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved analysis rounds.")


def _analyse(config, seeds: list[int], seed_dirs: list[str], keep_cache: bool) -> tuple[float, dict]:
    """(seconds, analysis result) of one analysis of the arm, its earlier reports (and cache) removed."""
    for seed_dir in seed_dirs:
        shutil.rmtree(os.path.join(seed_dir, toy_run.ANALYSIS_DIR, "report" if keep_cache else ""), ignore_errors=True)
    started = time.perf_counter()
    result = protocol.analyse_arm(config, seeds, seed_dirs)
    return time.perf_counter() - started, result


def main(argv):
    del argv
    launch.quiet_logs()
    config = _CONFIG.value
    config.analysis.positions = ("all", "scored")  # both routing views, as the protocol analyses them
    if config.train.eval_batch_size != config.analysis.batch_size:
        raise SystemExit(f"train.eval_batch_size {config.train.eval_batch_size} != analysis.batch_size "
                         f"{config.analysis.batch_size}: nothing would be handed over")
    seeds = list(range(_SEEDS.value))
    restored = []  # checkpoint steps the analyses load from disk (none on the handed side)
    restore = RunCheckpoints.restore_params
    RunCheckpoints.restore_params = lambda self, step, abstract: restored.append(step) or restore(
        self, step, abstract)
    with tempfile.TemporaryDirectory() as root:
        warmup = config.copy_and_resolve_references()
        warmup.train.steps = 1
        _analyse(warmup, [0], multiseed.train(warmup, os.path.join(root, "warmup"), [0], progress=False), True)
        config.train.steps = _STEPS.value
        trained, seed_dirs = {}, {}
        for name in SIDES:
            callbacks = toy_run.analysis_cache_callbacks(config) if name == "handed" else []
            started = time.perf_counter()
            seed_dirs[name] = multiseed.train(config, os.path.join(root, name), seeds, progress=False,
                                              callbacks=callbacks)
            trained[name] = time.perf_counter() - started
        analysed, results = {name: [] for name in SIDES}, {}
        for _ in range(_ROUNDS.value):
            for name in SIDES:
                restored.clear()
                seconds, results[name] = _analyse(config, seeds, seed_dirs[name], keep_cache=name == "handed")
                analysed[name].append(seconds)
                if name == "handed" and restored:
                    raise SystemExit(f"the handed side loaded checkpoints {sorted(set(restored))} from disk")
    views = {name: json.dumps(result["positions"], default=float) for name, result in results.items()}
    if views["extracts"] != views["handed"]:
        raise SystemExit("the two sides' analyses differ")
    print(f"{len(seeds)} seeds x {_STEPS.value} steps, checkpoints every {config.train.checkpoint_every}, "
          f"evaluations every {config.train.eval_every}, {_ROUNDS.value} analysis rounds; results identical")
    median = {name: statistics.median(times) for name, times in analysed.items()}
    for name in SIDES:
        print(f"  {name:9s} training {trained[name]:6.1f} s  analysis {', '.join(f'{t:.1f}' for t in analysed[name])} s"
              f" (median {median[name]:.1f})")
    totals = {name: trained[name] + median[name] for name in SIDES}
    print(f"analysis extracts / handed: {median['extracts'] / median['handed']:.2f}x; "
          f"training + analysis: {totals['extracts'] / totals['handed']:.2f}x")


if __name__ == "__main__":
    app.run(main)
