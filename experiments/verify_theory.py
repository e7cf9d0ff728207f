"""Synthetic check of the routing-kernel theory: pathway edit distance vs d_eff and the
generalization bound vs measured test error, over router seeds and cluster structures.

    python experiments/verify_theory.py --config.out=runs/theory

Writes results.csv, results.json and theory.png under config.out.

    python experiments/verify_theory.py --config.toy.workdir=runs/toy --config.out=runs/theory_toy

instead follows a finished toy grokking run: at every checkpoint, the multi-layer routing Gram
of a fixed sample of training examples, its d_eff and the bound, next to the test error.
"""
import os

from absl import app
from ml_collections import config_flags

from moe_grok.studies import launch, synthetic_theory, toy_bounds
from moe_grok.theory.synthetic_run import SyntheticConfig

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "verify_theory.py"), "Run config.")


def main(argv):
    del argv
    launch.quiet_logs()
    config = _CONFIG.value
    if config.toy.workdir:
        print(toy_bounds.run(config.toy.workdir, config.out, config.toy.samples,
                             SyntheticConfig.from_config(config.synthetic)))
        return
    print(synthetic_theory.run_sweep(config))


if __name__ == "__main__":
    app.run(main)
