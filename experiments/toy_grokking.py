"""Toy grokking reproduction: train a small MoE on modular arithmetic, then analyse its checkpoints
(the same job as `moe-grok toy`; --help lists its flags).

  python experiments/toy_grokking.py --workdir=runs/toy                       # default config
  python experiments/toy_grokking.py --workdir=runs/mix --config=toy_mixture  # 4 domains
  python experiments/toy_grokking.py --workdir=runs/toy --config.train.steps=6000

Re-running with the same workdir resumes training from its latest state and reuses the cached
analysis of finished checkpoints.
"""
import sys

from moe_grok.cli import run_job

if __name__ == "__main__":
    run_job("toy", sys.argv[1:], prog=f"python {sys.argv[0]}")
