"""The routing-kernel bound along a toy grokking run's checkpoints (docs/method.md, "Theory")."""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from matplotlib.figure import Figure

from moe_grok import atomic_files, strict_json
from moe_grok.analysis.grokking import metric_correlations
from moe_grok.checkpoints.cache import collect_checkpoint_stats
from moe_grok.data import tasks
from moe_grok.studies import toy_run
from moe_grok.theory import kernels as theory
from moe_grok.training.run_config import task_spec


def check_samples(n_samples) -> None:
    """ValueError unless n_samples (moe_grok/configs/verify_theory.py's `toy.samples`) is a positive integer:
    0 would divide by zero in the Gram's normalization, a negative count fails inside numpy."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"toy.samples must be a positive integer (training samples in the toy-run Gram), "
                         f"got {n_samples!r}")


def toy_run_bounds(workdir: str, n_samples: int = 1000, lam: float = 0.1, noise_std: float = 0.1,
                   delta: float = 0.05, c1: float = 1.0, seed: int = 0) -> list[dict]:
    """d_eff and the bound of the multi-layer routing Gram along a toy run's checkpoints.

    A seeded subset of n_samples training examples is followed across checkpoints (their
    routing from the run's analysis cache, computed if missing); targets are the centered
    one-hot answers [n, p]. Each row: step, test_error (1 - test accuracy), d_eff, bias,
    variance, bound. n_samples must be a positive integer (ValueError naming `toy.samples`
    otherwise, before any checkpoint is read).
    """
    check_samples(n_samples)
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    data = tasks.make_dataset(task_spec(config))
    stats = collect_checkpoint_stats(toy_run.run_checkpoint_sources(workdir), tasks.evaluation_splits(data),
                                     os.path.join(workdir, "analysis", "cache"),
                                     batch_size=config.analysis.batch_size, progress=False)
    n_train = len(data.train_targets)
    rows = np.sort(np.random.default_rng(seed).choice(n_train, min(n_samples, n_train), replace=False))
    p = data.spec.p
    y = np.eye(p, dtype=np.float32)[data.train_targets[rows]] - 1.0 / p
    bounds = theory.routing_bounds_along_checkpoints([s.splits["train"]["mean_weights"][rows] for s in stats],
                                                     y, lam, noise_std, delta, c1)
    return [{"step": s.step, "test_error": float(1.0 - s.splits["test"]["correct"].mean()),
             "d_eff": float(b.effective_dimension), "bias": float(b.bias), "variance": float(b.variance),
             "bound": float(b.total)} for s, b in zip(stats, bounds, strict=False)]


def format_toy_bounds(rows: list[dict]) -> str:
    """Table of toy_run_bounds rows plus Pearson/Spearman of d_eff and the bound with test error."""
    lines = [f"{'step':>7}{'test_err':>10}{'d_eff':>10}{'bias':>11}{'variance':>11}{'bound':>11}"]
    lines += [f"{r['step']:>7}{r['test_error']:>10.3f}{r['d_eff']:>10.2f}{r['bias']:>11.4g}{r['variance']:>11.4g}"
              f"{r['bound']:>11.4g}" for r in rows]
    error = np.array([r["test_error"] for r in rows])
    for name in ("d_eff", "bound"):
        c = metric_correlations(np.array([r[name] for r in rows]), error, 0)
        lines.append(f"{name} ~ test error over {c['n']} checkpoints: pearson {c['pearson_r']:+.3f}, "
                     f"spearman {c['spearman_r']:+.3f}")
    return "\n".join(lines)


def save_toy_bound_plot(rows: list[dict], path: str) -> None:
    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    for ax, key in zip(axes, ("test_error", "d_eff", "bound"), strict=False):
        ax.plot(steps, [r[key] for r in rows], marker=".")
        ax.set_title(key)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_files.writing(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def run(workdir: str, out_dir: str, samples: int, synthetic) -> str:
    """toy_run_bounds with the bound constants of `synthetic` (a SyntheticConfig); writes
    toy_bounds.json and toy_bounds.png to out_dir and returns the table."""
    check_samples(samples)
    rows = toy_run_bounds(workdir, samples, synthetic.lam, synthetic.noise_std, synthetic.delta, synthetic.c1)
    os.makedirs(out_dir, exist_ok=True)
    strict_json.dump(rows, os.path.join(out_dir, "toy_bounds.json"), indent=1)
    save_toy_bound_plot(rows, os.path.join(out_dir, "toy_bounds.png"))
    return format_toy_bounds(rows) + f"\nwrote {out_dir}/toy_bounds.json, toy_bounds.png"
