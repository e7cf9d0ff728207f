"""The paper's OLMoE experiment from a config (moe_grok/configs/olmoe_grokking.py): data, checkpoints, pipeline."""
from __future__ import annotations

import difflib
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from moe_grok import pipeline, sharding
from moe_grok.analysis.groups import load_embeddings
from moe_grok.analysis.options import AnalysisOptions
from moe_grok.analysis.test_results import TestResults
from moe_grok.checkpoints.sources import checkpoint_sources
from moe_grok.checkpoints.test_correctness import load_test_accuracy_csv, load_test_correctness_csv
from moe_grok.config import MOE_IMPLS
from moe_grok.data.corpus import load_split
from moe_grok.model.errors import CheckpointError

DTYPES = ("bfloat16", "float32")


def load_test_results(config: ml_collections.ConfigDict, steps: list[int]) -> TestResults | None:
    """TestResults from config.test_correctness_csv (per sample; with config.test_embeddings) or
    config.test_accuracy_csv (per domain), or None."""
    if config.test_correctness_csv:
        _, correct, rows = load_test_correctness_csv(config.test_correctness_csv, steps=steps)
        embeddings = {}
        if config.test_embeddings:
            # One row per test sample of the CSV, in first-appearance order.
            table = load_embeddings(config.test_embeddings, f"test ({config.test_correctness_csv})",
                                    sum(r.size for r in rows.values()))
            embeddings = {g: table[r] for g, r in rows.items()}
        return TestResults({g: c.mean(axis=1) for g, c in correct.items()}, correct, embeddings)
    if config.test_accuracy_csv:
        _, accuracy = load_test_accuracy_csv(config.test_accuracy_csv, steps=steps)
        return TestResults(accuracy)
    return None


def check_validation_domains(train_domains, validation_domains, validation_paths: str) -> None:
    """ValueError naming validation domains (file stems, or group field values) that match no
    training domain, with a "did you mean" hint; a warning names training domains without
    validation samples. Without the check `val/maths.jsonl` beside the domain `math` would
    silently leave `math` without its validation loss and held-out control."""
    unknown = [d for d in validation_domains if d not in train_domains]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, train_domains, n=1, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"validation_paths ({validation_paths}): domain(s) {', '.join(hints)} match no training "
                         f"domain {list(train_domains)}; a validation file is matched to its domain by its stem "
                         "(or group field), so name it as the training file")
    missing = [d for d in train_domains if d not in validation_domains]
    if missing:
        logging.warning("validation_paths (%s) holds no sample of domain(s) %s: they get no validation loss and "
                        "no held-out control", validation_paths, missing)


def data_notes(infos: dict[str, Any]) -> list[str]:
    """The report's lines about the loaded data (infos: split name -> its LoadInfo): repeated samples."""
    return [f"data: {info.n_duplicates} sample(s) of the {name} split repeat an earlier sample of their domain "
            "(kept; a sample and its copy are at pathway distance 0)"
            for name, info in infos.items() if info.n_duplicates]


def readable_model_settings(source) -> dict[str, Any] | None:
    """The MoEConfig fields of a checkpoint, when they can be read without loading it (a local
    directory, or a hub revision in the local hub cache); else None (the checkpoint's own load
    names what is wrong with it, in its place)."""
    if source.identity is None:
        return None
    try:
        return source.identity().get("model_config")
    except (CheckpointError, OSError, ValueError):
        return None


def check_mesh_fits(mesh, source) -> None:
    """ValueError before any work when `mesh.expert` does not divide the experts of the first
    checkpoint (`readable_model_settings`); every checkpoint is checked again when it loads."""
    if mesh is None or mesh.shape.get(sharding.EXPERT_AXIS, 1) == 1:
        return
    settings = readable_model_settings(source)
    if settings:
        sharding.check_expert_axis(mesh, settings["num_experts"], source.name)


def check_token_ids(split, info, split_name: str, pad_id: int, vocab_size: int, checkpoint: str) -> None:
    """ValueError naming `data.pad_id`, or the first samples (file and line, `LoadInfo.sample_ids`)
    whose real tokens (mask 1) lie outside [0, vocab_size) of `checkpoint`: before any checkpoint
    loads, where extraction would name no sample. split: EvalSplit [N, S]; info: its LoadInfo."""
    if pad_id >= vocab_size:
        raise ValueError(f"data.pad_id={pad_id} is not a token id of checkpoint {checkpoint} (vocab_size "
                         f"{vocab_size}): set data.pad_id to the model's padding token id")
    real = split.mask != 0
    bad_rows = np.flatnonzero((((split.tokens >= vocab_size) | (split.tokens < 0)) & real).any(axis=1))
    if bad_rows.size:
        examples = []
        for row in bad_rows[:3]:
            ids = split.tokens[row][real[row]]
            bad = ids[(ids >= vocab_size) | (ids < 0)]
            examples.append(f"{info.sample_ids[row]} (token id {int(bad[0])})")
        raise ValueError(f"{split_name} data: {bad_rows.size} sample(s) hold token ids outside [0, {vocab_size}), the "
                         f"vocabulary of checkpoint {checkpoint}, e.g. {', '.join(examples)}: a tokenizer of "
                         "another model? (set data.vocab_size to check ids while loading)")


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Validate the options and inputs, load the data, then run every checkpoint through the pipeline.

    Returns the report (also written to config.out_dir/report); the resolved config is recorded as
    config.out_dir/config.json."""
    options = AnalysisOptions.from_config(config.analysis)
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {config.dtype!r}")
    if config.moe_impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {config.moe_impl!r}")
    specs = [c for c in config.checkpoints.split(",") if c]
    sources = checkpoint_sources(specs, dtype=config.dtype, moe_impl=config.moe_impl)
    test = load_test_results(config, sorted(s.step for s in sources))
    splits, infos = {}, {}
    splits["train"], infos["train"] = load_split(config.data, return_info=True)
    if config.validation_paths:
        validation_config = config.data.copy_and_resolve_references()
        validation_config.paths = config.validation_paths
        splits["validation"], infos["validation"] = load_split(validation_config, return_info=True)
        check_validation_domains(splits["train"].group_names, splits["validation"].group_names,
                                 config.validation_paths)
    first = readable_model_settings(sources[0])
    if first:
        for name, split in splits.items():
            check_token_ids(split, infos[name], name, int(config.data.pad_id), first["vocab_size"], sources[0].name)
    if test is not None:
        test.check(splits["train"].group_names, len(sources))
    train_embeddings = None
    if config.train_embeddings:
        train_embeddings = load_embeddings(config.train_embeddings, "train", len(splits["train"]))
    mesh = sharding.make_mesh(data=None if config.mesh.data < 0 else config.mesh.data, expert=config.mesh.expert)
    logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    sources = checkpoint_sources(specs, dtype=config.dtype, mesh=mesh, moe_impl=config.moe_impl)
    check_mesh_fits(mesh, sources[0])
    validation = "validation" if "validation" in splits else None
    return pipeline.run_pipeline(sources, splits, config.out_dir, test=test, held_out_split=validation,
                                 validation_split=validation, train_embeddings=train_embeddings, options=options,
                                 batch_size=config.batch_size, mesh=mesh, progress=jax.process_index() == 0,
                                 with_plots=config.plots,
                                 run_config=config.copy_and_resolve_references().to_dict(),
                                 data_notes=data_notes(infos))
