"""Synthetic check of the routing-kernel theory, or the bound along a toy run (the same job as
`moe-grok theory`; --help lists its flags).

    python experiments/verify_theory.py --config.out=runs/theory
    python experiments/verify_theory.py --config.toy.workdir=runs/toy --config.out=runs/theory_toy
"""
import sys

from moe_grok.cli import run_job

if __name__ == "__main__":
    run_job("theory", sys.argv[1:], prog=f"python {sys.argv[0]}")
