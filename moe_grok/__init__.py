"""moe_grok: find grokking inside Mixture-of-Experts LMs by watching their routing pathways.

Layers (imports point down only; docs/architecture.md):
  sharding, config, locking, strict_json -> data -> analysis (pure array math) -> model -> extraction
  -> checkpoints / training / theory -> report -> pipeline -> studies (experiment code) / configs (the
  shipped run configs) -> cli (the `moe-grok` command; experiments/ launchers run its jobs).

The names below are the public API, imported lazily so that `import moe_grok.data` does
not pull in JAX or Flax.
"""
import importlib

__version__ = "0.1.0"

_PUBLIC = {
    # models: configs, Hugging Face loading (every family in model/families), moe_grok checkpoints, forward
    "MoEConfig": "moe_grok.config", "olmoe_1b_7b": "moe_grok.config", "olmoe_small": "moe_grok.config",
    "toy": "moe_grok.config",
    "CheckpointError": "moe_grok.model.hf", "UnsupportedModelTypeError": "moe_grok.model.hf",
    "load_hf": "moe_grok.model.hf",
    "save_params": "moe_grok.model.checkpoint_io", "restore_params": "moe_grok.model.checkpoint_io",
    "forward": "moe_grok.model.params", "init_params": "moe_grok.model.params",
    "router_matrices": "moe_grok.model.params",
    # extraction: per-sample routing, loss and correctness in one pass
    "extract_dataset": "moe_grok.extraction.routing", "extract_splits": "moe_grok.extraction.routing",
    "make_extractor": "moe_grok.extraction.routing",
    "EvalSplit": "moe_grok.data.splits",
    # the paper's metrics
    "pathway_strings": "moe_grok.analysis.pathways", "pathway_tokens": "moe_grok.analysis.pathways",
    "group_pathway_distance": "moe_grok.analysis.metrics", "cross_group_distance": "moe_grok.analysis.metrics",
    "pathway_consistency": "moe_grok.analysis.metrics", "pathway_complexity": "moe_grok.analysis.metrics",
    # the analysis and the pipeline
    "analyze": "moe_grok.analysis.analyze", "AnalysisOptions": "moe_grok.analysis.options",
    "CheckpointStats": "moe_grok.analysis.checkpoint_stats", "TestResults": "moe_grok.analysis.test_results",
    "CheckpointSource": "moe_grok.checkpoints.sources", "run_pipeline": "moe_grok.pipeline",
}
__all__ = sorted([*_PUBLIC, "__version__"])


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'moe_grok' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
