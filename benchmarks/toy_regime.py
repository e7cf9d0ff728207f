"""How a toy training regime behaves over seeds: grokking, loss spikes, flat training loss, routing.

Trains the config's seeds together (training.multiseed; resumes an existing workdir), then
prints one row per seed and a summary row, from metrics.jsonl and per-sample training losses
at every checkpoint:

  python benchmarks/toy_regime.py --workdir=runs/regime/default --seeds=8
  python benchmarks/toy_regime.py --workdir=runs/regime/lr3 --config.train.learning_rate=3e-3

Per seed:
  groks       grokking.grok_onset (accuracy > 0.9 from `grok`, a step, to the end; per operation for
              mixtures), here on the training log's accuracy over all held-out pairs (both halves): a
              pilot measure; the protocol's onsets apply the same rule to the test half
  memorized   first step from which train accuracy stays > 0.99
  spikes      evaluations after `memorized` where train accuracy falls by > 0.01 or train loss
              rises by > 0.05 nats (the memorization rule's delta) from the evaluation before
  early       share of training samples memorized (the paper's rule with eps 0.1 nats and delta 0.05:
              loss <= eps and within delta of its final value at every later checkpoint) at a
              checkpoint before `grok`: samples whose training loss is flat while test accuracy
              finishes its rise
  early_calibrated  the same share with the analysis' eps (calibrated per seed so that 20-25% of
              the samples are memorized before the last checkpoint: eps_calibrated), and
              first_memorized_calibrated the earliest t* with it
  entropy     train routing entropy (nats, token mean) at `memorized` and at the end
  length      pathway length (experts per layer, tau 0.7) at `memorized` and at the end
"""
import json
import os
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from moe_grok import configs
from moe_grok.analysis import grokking
from moe_grok.config import MoEConfig
from moe_grok.data import tasks
from moe_grok.extraction.routing import extract_dataset, make_extractor
from moe_grok.model import params as params_lib
from moe_grok.studies import launch
from moe_grok.training import multiseed
from moe_grok.training.checkpointing import RunCheckpoints
from moe_grok.training.metrics_log import read_metrics
from moe_grok.training.run_config import task_spec

_CONFIG = config_flags.DEFINE_config_file(
    "config", configs.path("toy_grokking"), "Toy run config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/regime", "Multi-seed workdir (resumed if it exists).")
_SEEDS = flags.DEFINE_integer("seeds", 8, "Seeds 0..seeds-1, trained together.")
_DELTA = 0.05  # nats: the memorization rule's delta
_EPS = 0.1  # nats: loss of a memorized sample


def per_sample_train_loss(config, workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps [C], loss [C, N_train]) at every params checkpoint of one seed's run."""
    data = tasks.make_dataset(task_spec(config))
    model_config = MoEConfig.load(workdir)
    checkpoints = RunCheckpoints(workdir)
    targets, target_mask = tasks.answer_targets(data.train_inputs, data.train_targets)
    abstract = params_lib.param_shapes(model_config)
    steps = checkpoints.steps()
    extractor = make_extractor(model_config)
    losses = [extract_dataset(model_config, checkpoints.restore_params(s, abstract), data.train_inputs, None, targets,
                              target_mask, batch_size=4096, extractor=extractor, progress=False)["loss"] for s in steps]
    return np.array(steps), np.stack(losses)


def seed_row(config, workdir: str) -> dict:
    metrics = read_metrics(workdir)
    steps = np.array([m["step"] for m in metrics])
    test_acc = np.array([m["test_accuracy"] for m in metrics])
    train_acc = np.array([m["train_accuracy"] for m in metrics])
    train_loss = np.array([m["train_loss"] for m in metrics])
    row = {"grok": grokking.grok_onset(test_acc, steps),
           "memorized": grokking.accuracy_onset(train_acc, steps, 0.99),
           "final_test_accuracy": float(test_acc[-1])}
    for op in config.task.ops:
        row[f"grok/{op}"] = grokking.grok_onset(np.array([m[f"test_accuracy/{op}"] for m in metrics]), steps)
    reached = np.flatnonzero(train_acc > 0.99)
    after = reached[0] + 1 if reached.size else len(steps)
    row["spikes"] = int(np.sum((np.diff(train_acc)[after - 1:] < -0.01) | (np.diff(train_loss)[after - 1:] > _DELTA)))
    at = reached[0] if reached.size else 0
    for key, name in (("train_routing_entropy", "entropy"), ("train_pathway_length", "length")):
        row[f"{name}_memorized"], row[f"{name}_end"] = float(metrics[at][key]), float(metrics[-1][key])
    ckpt_steps, loss = per_sample_train_loss(config, workdir)
    memorized = grokking.memorization_steps(loss, ckpt_steps, _EPS, _DELTA)
    row["early"] = float(np.mean((memorized >= 0) & (memorized < row["grok"]))) if row["grok"] >= 0 else 0.0
    try:  # the analysis' eps: calibrated to 20-25% memorized before the last checkpoint
        row["eps_calibrated"] = grokking.calibrate_eps(loss, ckpt_steps, _DELTA).eps
    except grokking.EpsCalibrationError:
        row["eps_calibrated"] = -1.0
    memorized = grokking.memorization_steps(loss, ckpt_steps, max(row["eps_calibrated"], 0.0), _DELTA)
    onset = row["grok"] if row["grok"] >= 0 else int(ckpt_steps[-1]) + 1
    row["early_calibrated"] = float(np.mean((memorized >= 0) & (memorized < onset)))
    memorized = memorized[memorized >= 0]
    row["first_memorized_calibrated"] = int(memorized.min()) if memorized.size else -1
    return row


def summary(rows: list[dict], ops) -> dict:
    def median(key):
        values = [r[key] for r in rows if r[key] >= 0]
        return float(np.median(values)) if values else -1.0

    out = {"seeds": len(rows), "grok_share": float(np.mean([r["grok"] >= 0 for r in rows])),
           "grok_median": median("grok"), "memorized_median": median("memorized"),
           "spikes": int(sum(r["spikes"] for r in rows)), "early": float(np.mean([r["early"] for r in rows])),
           "early_calibrated": float(np.mean([r["early_calibrated"] for r in rows]))}
    for op in ops:
        out[f"grok_share/{op}"] = float(np.mean([r[f"grok/{op}"] >= 0 for r in rows]))
        out[f"grok_median/{op}"] = median(f"grok/{op}")
    for key in ("entropy_memorized", "entropy_end", "length_memorized", "length_end", "final_test_accuracy"):
        out[key] = float(np.mean([r[key] for r in rows]))
    return out


def main(argv):
    del argv
    launch.quiet_logs()
    config = _CONFIG.value
    seeds = list(range(_SEEDS.value))
    started = time.time()
    seed_dirs = multiseed.train(config, _WORKDIR.value, seeds)
    train_seconds = time.time() - started
    rows = []
    for seed, seed_dir in zip(seeds, seed_dirs, strict=True):
        seed_config = config.copy_and_resolve_references()
        seed_config.train.seed = seed
        rows.append(seed_row(seed_config, seed_dir))
        print(f"seed {seed}: " + json.dumps(rows[-1]))
    result = {**summary(rows, config.task.ops), "train_seconds": round(train_seconds, 1)}
    print("summary: " + json.dumps(result))
    with open(os.path.join(_WORKDIR.value, "regime.json"), "w") as f:
        json.dump({"rows": rows, "summary": result}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
