"""Toy grokking reproduction: train a small MoE on modular arithmetic, then analyze its checkpoints.

  python experiments/toy_grokking.py --workdir=runs/toy                # default config
  python experiments/toy_grokking.py --config=configs/toy_mixed.py --workdir=runs/mixed
  python experiments/toy_grokking.py --workdir=runs/toy --config.train.steps=6000

Re-running with the same workdir resumes training from its latest checkpoint and reuses
the cached analysis of finished checkpoints.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

from moe_grok import analysis, training

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "toy_grokking.py"), "Run config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/toy", "Run directory (checkpoints, metrics, report).")
_SKIP_TRAINING = flags.DEFINE_bool("skip_training", False, "Only analyze the checkpoints already in workdir.")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint read at INFO
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if not _SKIP_TRAINING.value:
        last = training.train(config, _WORKDIR.value)
        print(f"trained to step {last.get('step')}: train acc {last.get('train_accuracy', float('nan')):.3f}, "
              f"test acc {last.get('test_accuracy', float('nan')):.3f}")
    report = training.analyze_run(config, _WORKDIR.value)
    print(analysis.format_table(report))
    print(f"report: {os.path.join(_WORKDIR.value, 'analysis', 'report')}")


if __name__ == "__main__":
    app.run(main)
