"""How fast router, expert and attention weights move between checkpoints (the paper's Appendix D).

Every checkpoint contributes a fixed sample of each parameter's entries (the same positions
at every checkpoint, drawn from a seed derived from the parameter's path): all entries of a
parameter with at most `sample_size` of them, else `sample_size` positions drawn uniformly
with replacement. Norms and inner products of a family (router / experts / attention / other)
are estimated from the samples, each parameter's sums scaled by size / samples, so the
estimate is exact for small models and unbiased for large ones (OLMoE-1B-7B's expert stacks
have 2.1B entries each).

Per pair of consecutive checkpoints t0 < t1 and family:
  relative_change        = |W(t1) - W(t0)| / |W(t0)|          (Frobenius norms over the family)
  speed                  = relative_change / (t1 - t0) * 1000  (per 1,000 training steps)
  stability              = cos(W(t0), W(t1))                   (1 = the weights did not turn)
  normalized_norm_change = (|W(t1)| - |W(t0)|) / |W(t0)|      (the norm's change, normalized by its scale)

Per family over the run (`dynamics_summary`; the paper's Appendix D as the audit of issue 34
describes it, since its text was not at hand: docs/method.md):
  early_change / late_change = mean |normalized_norm_change| over the first / second half of the pairs
  convergence_speed          = (early_change - late_change) / early_change   (how much the change shrinks)
  norm_stability             = 1 / std(normalized_norm_change)               (over every pair)
"""
from __future__ import annotations

import itertools
import zlib

import jax
import numpy as np

FAMILIES = ("router", "experts", "attention", "other")
DEFAULT_SAMPLE_SIZE = 1 << 16


def family_of(path: str) -> str:
    """Family of a public parameter path such as "layers/moe/router", "layers/attn/q_proj/kernel" or
    (per-layer expert arrays) "experts/0/gate_proj"."""
    if path.endswith("moe/router"):
        return "router"
    if "/moe/" in path or path.startswith("experts/"):
        return "experts"
    if "/attn/" in path:
        return "attention"
    return "other"


def _sample_positions(path: str, shape: tuple[int, ...], sample_size: int):
    """Index tuple selecting the sampled entries (None: every entry)."""
    if int(np.prod(shape)) <= sample_size:
        return None
    rng = np.random.default_rng(zlib.crc32(path.encode()))
    return tuple(rng.integers(0, n, sample_size) for n in shape)


def parameter_sample(params, sample_size: int = DEFAULT_SAMPLE_SIZE) -> dict[str, np.ndarray]:
    """{"path": float32 sample [<= sample_size]} plus {"path#size": total entries} for every parameter."""
    out = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = "/".join(str(getattr(k, "key", k)) for k in key_path)
        positions = _sample_positions(path, leaf.shape, sample_size)
        pick = (lambda a: a.reshape(-1)) if positions is None else (lambda a, p=positions: a[p])
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            # Split over several processes' devices (experts over "expert"): every process gets the
            # whole sample, replicated over the array's mesh.
            replicated = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
            values = jax.jit(pick, out_shardings=replicated)(leaf)
        else:
            values = pick(leaf)
        out[path] = np.asarray(jax.device_get(values), np.float32)
        out[f"{path}#size"] = np.asarray(leaf.size, np.int64)
    return out


def _family_sums(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per family: estimated (|W0|^2, |W1|^2, <W0, W1>, |W1 - W0|^2)."""
    sums = {f: np.zeros(4) for f in FAMILIES}
    for path, w0 in before.items():
        if path.endswith("#size") or path not in after:
            continue
        w1 = after[path].astype(np.float64)
        w0 = w0.astype(np.float64)
        scale = float(before[f"{path}#size"]) / w0.size
        sums[family_of(path)] += scale * np.array([w0 @ w0, w1 @ w1, w0 @ w1, (w1 - w0) @ (w1 - w0)])
    return sums


def parameter_dynamics(steps, samples: list[dict[str, np.ndarray]]) -> list[dict]:
    """One row per (consecutive checkpoint pair, family): step_from, step_to, family,
    relative_change, speed_per_1k_steps, stability (see the module docstring)."""
    rows = []
    for (t0, before), (t1, after) in itertools.pairwise(zip(steps, samples, strict=True)):
        for family, (n0, n1, dot, diff) in _family_sums(before, after).items():
            if n0 == 0:
                continue
            change = float(np.sqrt(diff / n0))
            rows.append({"step_from": int(t0), "step_to": int(t1), "family": family, "relative_change": change,
                         "speed_per_1k_steps": change / (t1 - t0) * 1000.0,
                         "stability": float(dot / np.sqrt(n0 * n1)) if n1 > 0 else float("nan"),
                         "normalized_norm_change": float((np.sqrt(n1) - np.sqrt(n0)) / np.sqrt(n0))})
    return rows


def dynamics_summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{family: {"early_change", "late_change", "convergence_speed", "norm_stability", "pairs"}} from
    `parameter_dynamics` rows (see the module docstring); with an odd number of pairs the middle one
    is in neither half. NaN where undefined (fewer than 2 pairs; no early change; a constant change)."""
    out = {}
    for family in FAMILIES:
        changes = np.array([r["normalized_norm_change"] for r in rows if r["family"] == family], np.float64)
        if changes.size == 0:
            continue
        half = changes.size // 2
        early = float(np.mean(np.abs(changes[:half]))) if half else float("nan")
        late = float(np.mean(np.abs(changes[changes.size - half:]))) if half else float("nan")
        spread = float(np.std(changes, ddof=1)) if changes.size > 1 else float("nan")
        out[family] = {"early_change": early, "late_change": late,
                       "convergence_speed": (early - late) / early if half and early > 0 else float("nan"),
                       "norm_stability": 1.0 / spread if spread > 0 else float("nan"), "pairs": int(changes.size)}
    return out
