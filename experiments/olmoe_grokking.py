"""OLMoE checkpoint analysis (the same job as `moe-grok olmoe`; --help lists its flags and an example).

  python experiments/olmoe_grokking.py --config.checkpoints=... --config.data.paths=... --config.out_dir=runs/olmoe
"""
import sys

from moe_grok.cli import run_job

if __name__ == "__main__":
    run_job("olmoe", sys.argv[1:], prog=f"python {sys.argv[0]}")
