"""The toy protocol of docs/protocol.md: every arm, every seed (trained together), analysis, tables
(the same job as `moe-grok protocol`; --help lists its flags).

  python experiments/toy_protocol.py --workdir=runs/protocol
"""
import sys

from moe_grok.cli import run_job

if __name__ == "__main__":
    run_job("protocol", sys.argv[1:], prog=f"python {sys.argv[0]}")
