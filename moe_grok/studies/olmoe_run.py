"""The paper's OLMoE experiment from a config (configs/olmoe_grokking.py): data, checkpoints, pipeline."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
from absl import logging

from moe_grok import pipeline, sharding
from moe_grok.analysis.analyze import AnalysisOptions
from moe_grok.analysis.sources import checkpoint_sources
from moe_grok.analysis.test_accuracy import load_test_accuracy_csv
from moe_grok.data.corpus import load_split


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Validate the options, load the data, then run every checkpoint through the pipeline.

    Returns the report (also written to config.out_dir/report)."""
    options = AnalysisOptions.from_config(config.analysis)
    mesh = sharding.make_mesh(data=None if config.mesh.data < 0 else config.mesh.data, expert=config.mesh.expert)
    logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    split = load_split(config.data)
    sources = checkpoint_sources([c for c in config.checkpoints.split(",") if c], dtype=config.dtype, mesh=mesh)
    test_accuracy = None
    if config.test_accuracy_csv:
        _, test_accuracy = load_test_accuracy_csv(config.test_accuracy_csv, steps=[s.step for s in sources])
    return pipeline.run_pipeline(sources, {"train": split}, config.out_dir, test_accuracy=test_accuracy,
                                 options=options, batch_size=config.batch_size, mesh=mesh,
                                 progress=jax.process_index() == 0)
