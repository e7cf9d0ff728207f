"""OLMoE checkpoint analysis: per-sample loss and pathways of grouped training data across
checkpoints, memorization per group, pathway metrics, optional correlation with test accuracy.

  python experiments/olmoe_grokking.py --config=configs/olmoe_grokking.py \\
      --config.checkpoints=allenai/OLMoE-1B-7B-0924@step5000-tokens20B,\
allenai/OLMoE-1B-7B-0924@step245000-tokens1027B \\
      --config.data.paths=data/owm.jsonl,data/starcoder.jsonl --config.data.tokenizer=tokenizer.json \\
      --config.out_dir=runs/olmoe

An interrupted run resumes: finished checkpoints are read from out_dir/cache.
"""
import os

from absl import app
from ml_collections import config_flags

from moe_grok.studies import launch

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "olmoe_grokking.py"), "Run config.")


def main(argv):
    del argv
    launch.quiet_logs()
    config = _CONFIG.value
    import jax

    if config.distributed:  # before any other JAX call
        jax.distributed.initialize()
    from moe_grok.report.files import format_table
    from moe_grok.studies import olmoe_run

    report = olmoe_run.run(config)
    if jax.process_index() == 0:
        print(format_table(report))
        print(f"report: {os.path.join(config.out_dir, 'report')}")


if __name__ == "__main__":
    app.run(main)
