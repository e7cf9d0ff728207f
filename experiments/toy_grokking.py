"""Toy grokking reproduction: train a small MoE on modular arithmetic, then analyse its checkpoints.

  python experiments/toy_grokking.py --workdir=runs/toy                       # default config
  python experiments/toy_grokking.py --workdir=runs/mix --config=configs/toy_mixture.py   # 4 domains
  python experiments/toy_grokking.py --workdir=runs/toy --config.train.steps=6000

Re-running with the same workdir resumes training from its latest state and reuses the
cached analysis of finished checkpoints.
"""
import os

from absl import app, flags
from ml_collections import config_flags

from moe_grok.report.files import format_table
from moe_grok.studies import launch, toy_run
from moe_grok.training import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "toy_grokking.py"), "Run config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/toy", "Run directory (checkpoints, metrics, report).")
_SKIP_TRAINING = flags.DEFINE_bool("skip_training", False, "Only analyse the checkpoints already in workdir.")


def main(argv):
    del argv
    launch.quiet_logs()
    config = _CONFIG.value
    if not _SKIP_TRAINING.value:
        last = loop.train(config, _WORKDIR.value, callbacks=toy_run.training_callbacks(config))
        print(f"trained to step {last['step']}: train acc {last['train_accuracy']:.3f}, "
              f"test acc {last['test_accuracy']:.3f}")
    report = toy_run.analyze_run(config, _WORKDIR.value)
    print(format_table(report))
    print(f"report: {os.path.join(_WORKDIR.value, 'analysis', 'report')}")


if __name__ == "__main__":
    app.run(main)
