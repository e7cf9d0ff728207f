"""OLMoE checkpoint analysis: per-sample loss and pathways of grouped training data across
checkpoints, memorization per group, pathway metrics, optional correlation with test accuracy.

  python experiments/olmoe_grokking.py --config=configs/olmoe_grokking.py \\
      --config.checkpoints=allenai/OLMoE-1B-7B-0924@step5000-tokens20B,allenai/OLMoE-1B-7B-0924@step245000-tokens1027B \\
      --config.data.paths=data/owm.jsonl,data/starcoder.jsonl --config.data.tokenizer=tokenizer.json \\
      --config.out_dir=runs/olmoe

An interrupted run resumes: finished checkpoints are read from out_dir/cache.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "olmoe_grokking.py"), "Run config.")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint read at INFO
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    import jax

    if config.distributed:
        jax.distributed.initialize()
    from moe_grok import analysis, data, sharding

    expert = config.mesh.expert
    mesh = sharding.make_mesh(data=None if config.mesh.data < 0 else config.mesh.data, expert=expert)
    logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    split = data.load_split(config.data)
    sources = analysis.hf_checkpoint_sources([c for c in config.checkpoints.split(",") if c],
                                             dtype=config.dtype, mesh=mesh)
    test_accuracy = None
    if config.test_accuracy_csv:
        _, test_accuracy = data.load_test_accuracy_csv(config.test_accuracy_csv,
                                                       steps=[s.step for s in sources])
    a = config.analysis
    options = analysis.AnalysisOptions(tau=a.tau, delta=a.delta, target_fraction=tuple(a.target_fraction),
                                       distance_level=a.distance_level, max_pairs=a.max_pairs)
    report = analysis.run_pipeline(sources, {"train": split}, config.out_dir, test_accuracy=test_accuracy,
                                   options=options, batch_size=config.batch_size, mesh=mesh,
                                   progress=jax.process_index() == 0)
    if jax.process_index() == 0:
        print(analysis.format_table(report))
        print(f"report: {os.path.join(config.out_dir, 'report')}")


if __name__ == "__main__":
    app.run(main)
