"""Convert an HF checkpoint of a supported model family into a moe_grok checkpoint (the same job as
`moe-grok convert`; --help lists its flags).

  python experiments/convert_checkpoint.py --hf_path=allenai/OLMoE-1B-7B-0924 \\
      --revision=step245000-tokens1027B --out=ckpts/olmoe-step245000 --dtype=bfloat16
"""
import sys

from moe_grok.cli import run_job

if __name__ == "__main__":
    run_job("convert", sys.argv[1:], prog=f"python {sys.argv[0]}")
