"""The paper's synthetic check of the routing-kernel theory (docs/method.md, "Theory").

Gaussian clusters in ``dim`` dimensions, a one-layer MoE of one-hidden-layer ReLU experts
whose router is random and FROZEN, experts trained with optax. One run measures, on the
training set only: pathway strings and their mean pairwise edit distance, the routing Gram
H (infinite-width analytic NTK), d_eff(lam) and the bound; then the test error after training.

Model (NTK parameterization, matches ``theory.relu_ntk``; all parameters ~ N(0, 1)):
    probs(x)  = softmax(router_scale * x W_r / sqrt(d))             [E], W_r frozen
    gates(x)  = probs (soft routing, top_k=0) or probs masked to the top-k experts
                (no renormalization, OLMoE style)
    f_j(x)    = (1/sqrt(m)) sum_r a_jr relu(w_jr . x / sqrt(d))
    F(x)      = sum_j gates_j(x) f_j(x)
Pathway strings always use the full softmax ``probs`` (as in the paper); the kernel uses
the ``gates`` of the forward pass. ``router_scale`` is an inverse softmax temperature: larger
values give sharper routing and shorter pathways. Predictions are centered at initialization
(F - F_init) so the trained network, like kernel ridge regression with H, starts from zero.
Targets: every cluster gets a label +-1 (balanced), y = label + N(0, noise_std^2); the test
error is the MSE against the clean labels (the excess risk the bound is about). The bound
uses the observed noisy y_train and the true noise_std. With ``ridge_training`` the experts
minimize MSE + (lam/n)|theta - theta_init|^2, i.e. (in the lazy regime) kernel ridge
regression with the same lam as the bound; ``krr_test_mse`` is that regression done exactly.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import itertools
import math
import os
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from moe_grok import strict_json
from moe_grok.analysis.metrics import group_pathway_distance
from moe_grok.analysis.pathways import pathway_strings
from moe_grok.analysis.statistics import fisher_interval
from moe_grok.sharding import shard_batch
from moe_grok.theory import kernels as theory


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """One synthetic run. Cluster structure = (n_clusters, spread); spread is the within-cluster
    standard deviation relative to the unit-variance cluster centers."""

    dim: int = 100
    n_clusters: int = 4
    spread: float = 0.5
    n_train: int = 200
    n_test: int = 1000
    noise_std: float = 0.1
    num_experts: int = 16
    width: int = 128
    router_scale: float = 1.0
    top_k: int = 0  # 0 = soft routing over all experts
    tau: float = 0.7
    steps: int = 500
    learning_rate: float = 3e-3
    lam: float = 0.1
    ridge_training: bool = True  # train with the (lam/n)|theta - theta_init|^2 penalty that matches the bound's lam
    delta: float = 0.05
    c1: float = 1.0
    data_seed: int = 0
    router_seed: int = 0
    expert_seed: int = 0


    @classmethod
    def from_config(cls, config) -> SyntheticConfig:
        """From a config section holding every field (configs/verify_theory.py's `synthetic`)."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in config]
        if missing:
            raise ValueError(f"synthetic config lacks {missing}; declare every SyntheticConfig field")
        return cls(**{n: config[n] for n in names})


def synthetic_config(**overrides) -> ml_collections.ConfigDict:
    """A config section declaring every SyntheticConfig field (its defaults, then `overrides`)."""
    fields = dataclasses.asdict(SyntheticConfig())
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


class ClusterData(NamedTuple):
    """x_* [n, dim] float32; y_train [n] noisy labels; f_* [n] clean labels; cluster_* [n] int."""

    x_train: np.ndarray
    y_train: np.ndarray
    f_train: np.ndarray
    cluster_train: np.ndarray
    x_test: np.ndarray
    f_test: np.ndarray
    cluster_test: np.ndarray


def make_cluster_data(
    seed: int, *, dim: int, n_clusters: int, spread: float, n_train: int, n_test: int, noise_std: float
) -> ClusterData:
    """Gaussian clusters: centers ~ N(0, I_dim), x = center + spread * N(0, I_dim), then rescaled to
    norm sqrt(dim) (the ReLU NTK depends only on angles there, and router logits keep one scale
    whatever the spread). Labels: balanced +-1 per cluster; y_train adds N(0, noise_std^2)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim))
    labels = rng.permutation(np.where(np.arange(n_clusters) % 2 == 0, 1.0, -1.0))

    def sample(count):
        cluster = rng.integers(n_clusters, size=count)
        x = centers[cluster] + spread * rng.standard_normal((count, dim))
        x *= math.sqrt(dim) / np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32), labels[cluster].astype(np.float32), cluster

    x_train, f_train, cluster_train = sample(n_train)
    x_test, f_test, cluster_test = sample(n_test)
    y_train = (f_train + noise_std * rng.standard_normal(n_train)).astype(np.float32)
    return ClusterData(x_train, y_train, f_train, cluster_train, x_test, f_test, cluster_test)


class ReluExperts(nn.Module):
    """``num_experts`` one-hidden-layer ReLU networks (NTK parameterization). x [b, d] -> [b, E]."""

    num_experts: int
    width: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        hidden = self.param("hidden", nn.initializers.normal(1.0), (self.num_experts, d, self.width))
        output = self.param("output", nn.initializers.normal(1.0), (self.num_experts, self.width))
        pre = jnp.einsum("bd,edm->bem", x, hidden, precision=theory.HIGHEST) / math.sqrt(d)
        return jnp.einsum("bem,em->be", jax.nn.relu(pre), output, precision=theory.HIGHEST) / math.sqrt(self.width)


class OneLayerMoE(nn.Module):
    """F(x) = sum_j gates_j(x) f_j(x). x [b, d] -> [b]; ``routing(x)`` -> (probs, gates) [b, E]."""

    num_experts: int = 16
    width: int = 128
    router_scale: float = 1.0
    top_k: int = 0

    def setup(self):
        self.router = nn.Dense(self.num_experts, use_bias=False, kernel_init=nn.initializers.normal(1.0))
        self.experts = ReluExperts(self.num_experts, self.width)

    def routing(self, x):
        logits = self.router_scale * self.router(x) / math.sqrt(x.shape[-1])
        probs = jax.nn.softmax(logits, axis=-1)
        if not self.top_k:
            return probs, probs
        kth = jax.lax.top_k(probs, self.top_k)[0][:, -1:]
        return probs, jnp.where(probs >= kth, probs, 0.0)

    def __call__(self, x):
        _, gates = self.routing(x)
        return jnp.sum(gates * self.experts(x), axis=-1)


def init_moe(model: OneLayerMoE, dim: int, router_seed: int, expert_seed: int):
    """Parameters with the router drawn from ``router_seed`` and the experts from ``expert_seed``."""
    dummy = jnp.zeros((1, dim), jnp.float32)
    router = model.init(jax.random.PRNGKey(router_seed), dummy)["params"]["router"]
    experts = model.init(jax.random.PRNGKey(expert_seed), dummy)["params"]["experts"]
    return {"params": {"router": router, "experts": experts}}


def expert_only_optimizer(learning_rate: float) -> optax.GradientTransformation:
    """Adam on the experts; the router gets zero updates (frozen)."""
    def labels(params):
        return {"params": {name: jax.tree.map(lambda _, label="frozen" if name == "router" else "trained": label, sub)
                           for name, sub in params["params"].items()}}

    return optax.multi_transform({"trained": optax.adam(learning_rate), "frozen": optax.set_to_zero()}, labels)


@functools.partial(jax.jit, static_argnames=("model", "steps", "learning_rate"))
def _train(model, params, x, y, offset, ridge, steps, learning_rate):
    optimizer = expert_only_optimizer(learning_rate)
    init_experts = params["params"]["experts"]

    def loss_fn(p):
        mse = jnp.mean((model.apply(p, x) - offset - y) ** 2)
        drift = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), p["params"]["experts"], init_experts)
        return mse + ridge / x.shape[0] * sum(jax.tree.leaves(drift)), mse

    def step(carry, _):
        p, opt_state = carry
        (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), mse

    (params, _), mses = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params, mses


def train_experts(
    model: OneLayerMoE, params, x, y, *, steps: int, learning_rate: float, ridge: float = 0.0, mesh: Mesh | None = None
):
    """Full-batch Adam on mean((F(x) - F_init(x) - y)^2) + (ridge/n) |theta_experts - theta_init|^2.

    The router is frozen. In the lazy (NTK) regime the minimizer is kernel ridge regression
    with the routing kernel and ridge ``ridge``. x [n, d], y [n] -> (trained params, training
    MSE before each step [steps]). With ``mesh`` the batch is split over the data axis (n
    divisible by its size).
    """
    x, y = shard_batch((jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)), mesh)
    offset = model.apply(params, x)
    return _train(model, params, x, y, offset, ridge, steps, learning_rate)


def run_synthetic(config: SyntheticConfig, mesh: Mesh | None = None) -> dict:
    """One synthetic run -> flat dict of measurements (floats / ints, JSON-serializable)."""
    data = make_cluster_data(
        config.data_seed, dim=config.dim, n_clusters=config.n_clusters, spread=config.spread,
        n_train=config.n_train, n_test=config.n_test, noise_std=config.noise_std,
    )
    model = OneLayerMoE(config.num_experts, config.width, config.router_scale, config.top_k)
    params = init_moe(model, config.dim, config.router_seed, config.expert_seed)

    probs, gates = model.apply(params, data.x_train, method=OneLayerMoE.routing)
    paths = pathway_strings(np.asarray(probs)[:, None, :], tau=config.tau)
    edit_distance = group_pathway_distance(paths, level="char")
    edit_distance_normalized = group_pathway_distance(paths, level="char", normalized=True)
    path_lengths = [len(p.split(",")) for p in paths]

    gram = theory.routing_relu_ntk_gram(gates, data.x_train, mesh=mesh)
    spectrum = theory.kernel_spectrum(gram)
    bound = theory.generalization_bound(spectrum, data.y_train, config.lam, config.noise_std, config.delta, config.c1)

    _, test_gates = model.apply(params, data.x_test, method=OneLayerMoE.routing)
    cross_gram = theory.routing_relu_ntk_gram(test_gates, data.x_test, gates, data.x_train, mesh=mesh)
    krr_test = theory.kernel_ridge_predict(spectrum, data.y_train, cross_gram, config.lam)

    trained, _ = train_experts(
        model, params, data.x_train, data.y_train, steps=config.steps, learning_rate=config.learning_rate,
        ridge=config.lam if config.ridge_training else 0.0, mesh=mesh,
    )
    predict = lambda x: model.apply(trained, x) - model.apply(params, x)
    test_pred = predict(data.x_test)
    return {
        **dataclasses.asdict(config),
        "edit_distance": edit_distance,
        "edit_distance_normalized": edit_distance_normalized,
        "distinct_pathways": len(set(paths)),
        "mean_pathway_experts": float(np.mean(path_lengths)),
        "gram_trace_per_sample": float(jnp.trace(gram) / config.n_train),
        "d_eff": float(bound.effective_dimension),
        "d_eff_normalized": float(bound.effective_dimension) / config.n_train,
        "bias": float(bound.bias),
        "variance": float(bound.variance),
        "confidence": float(bound.confidence),
        "bound": float(bound.total),
        "train_mse": float(jnp.mean((predict(data.x_train) - data.y_train) ** 2)),
        "test_mse": float(jnp.mean((test_pred - data.f_test) ** 2)),
        "test_error_rate": float(jnp.mean(jnp.sign(test_pred) != data.f_test)),
        "krr_test_mse": float(jnp.mean((krr_test - data.f_test) ** 2)),
    }


# ----------------------------------------------------------------------------- sweeps & reports
TABLE_COLUMNS = {  # result key -> table header
    "n_clusters": "clusters", "spread": "spread", "router_scale": "r_scale", "router_seed": "r_seed",
    "edit_distance": "edit_dist", "edit_distance_normalized": "edit_norm", "mean_pathway_experts": "path_len",
    "d_eff": "d_eff", "d_eff_normalized": "d_eff_norm", "bias": "bias", "variance": "variance", "bound": "bound",
    "train_mse": "train_mse",
    "test_mse": "test_mse", "krr_test_mse": "krr_mse",
}
CORRELATION_PAIRS = (  # the first is the paper's Fig. 8 (primary)
    ("edit_distance_normalized", "d_eff_normalized"),
    ("edit_distance", "d_eff"),
    ("mean_pathway_experts", "d_eff_normalized"),
    ("bound", "test_mse"),
    ("bound", "krr_test_mse"),
)


def sweep_synthetic(base: SyntheticConfig, structures, router_seeds, router_scales=(1.0,), mesh=None,
                    progress: bool = True):
    """Run every (n_clusters, spread) structure x router_scale x router_seed -> list of result dicts."""
    grid = list(itertools.product(structures, router_scales, router_seeds))
    return [run_synthetic(dataclasses.replace(base, n_clusters=n_clusters, spread=spread, router_scale=scale,
                                              router_seed=seed), mesh=mesh)
            for (n_clusters, spread), scale, seed in tqdm(grid, desc="synthetic runs", disable=not progress)]


def format_table(rows, columns=TABLE_COLUMNS, header=True, width=9) -> str:
    """Fixed-width text table of the result dicts; ``columns`` maps result keys to headers."""
    cell = lambda v: f"{v:>{width}.4g}" if isinstance(v, float) else f"{v:>{width}}"
    lines = [" ".join(f"{name:>{width}}" for name in columns.values())] if header else []
    lines += [" ".join(cell(row[key]) for key in columns) for row in rows]
    return "\n".join(lines)


def _group_key(row):
    return (row["n_clusters"], row["spread"], row["router_scale"])


def _structure_label(key) -> str:
    return f"K={key[0]} spread={key[1]} scale={key[2]}"


def within_structure(rows, a: str, b: str) -> dict:
    """The paper's design (Fig. 8): only the router seed varies inside a structure.

    Returns {"per_structure": {label: {"r", "ci95", "n"}}, "pooled": {"r", "ci95", "n"}} where
    pooled is the Pearson r of a and b after removing each structure's mean, its CI from Fisher z
    with n - (structures - 1) effective pairs."""
    from scipy import stats

    keys = sorted({_group_key(r) for r in rows})
    per, da, db = {}, [], []
    for key in keys:
        va = np.array([r[a] for r in rows if _group_key(r) == key], np.float64)
        vb = np.array([r[b] for r in rows if _group_key(r) == key], np.float64)
        r_value = float(stats.pearsonr(va, vb).statistic) if len(va) >= 3 and np.ptp(va) and np.ptp(vb) else np.nan
        per[_structure_label(key)] = {"r": r_value, "ci95": fisher_interval(r_value, len(va)), "n": len(va)}
        da.append(va - va.mean())
        db.append(vb - vb.mean())
    da, db = np.concatenate(da), np.concatenate(db)
    pooled = float(stats.pearsonr(da, db).statistic) if np.ptp(da) and np.ptp(db) else np.nan
    effective = len(da) - (len(keys) - 1)
    return {"per_structure": per, "pooled": {"r": pooled, "ci95": fisher_interval(pooled, effective),
                                             "n": int(len(da))}}


def correlations(rows, pairs=CORRELATION_PAIRS) -> dict:
    """For each (a, b): Pearson and Spearman over all runs (structures pooled: secondary) and the
    within-structure correlations (primary: only router-seed variation remains)."""
    from scipy import stats

    out = {}
    for a, b in pairs:
        va, vb = (np.array([r[k] for r in rows], np.float64) for k in (a, b))
        out[f"{a}~{b}"] = {
            "within_structure": within_structure(rows, a, b),
            "pooled_pearson": float(stats.pearsonr(va, vb).statistic),
            "pooled_spearman": float(stats.spearmanr(va, vb).statistic),
            "num_runs": len(rows),
        }
    return out


def format_correlations(corr: dict) -> str:
    lines = []
    for name, c in corr.items():
        w = c["within_structure"]["pooled"]
        lines.append(f"{name:<38} within structures r={w['r']:+.3f} [95% CI {w['ci95'][0]:+.2f}, {w['ci95'][1]:+.2f}]"
                     f" (n={w['n']});  all runs pooled: pearson={c['pooled_pearson']:+.3f} "
                     f"spearman={c['pooled_spearman']:+.3f}")
        for label, s in c["within_structure"]["per_structure"].items():
            lines.append(f"    {label:<30} r={s['r']:+.3f} [{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}] (n={s['n']})")
    return "\n".join(lines)


def save_plots(rows, corr: dict, path: str) -> None:
    """PNG. Primary (top): normalized edit distance vs normalized d_eff within each structure
    (structure means removed), and each structure's r with its 95% CI. Secondary (bottom): all
    runs pooled, and the bound vs the measured test MSE."""
    fig = Figure(figsize=(11, 9))
    (within, per_structure), (pooled, bound) = fig.subplots(2, 2)
    keys = sorted({_group_key(r) for r in rows})
    main = corr["edit_distance_normalized~d_eff_normalized"]["within_structure"]
    for key in keys:
        sub = [r for r in rows if _group_key(r) == key]
        x = np.array([r["edit_distance_normalized"] for r in sub])
        y = np.array([r["d_eff_normalized"] for r in sub])
        label = _structure_label(key)
        within.scatter(x - x.mean(), y - y.mean(), s=14, label=f"{label} (r={main['per_structure'][label]['r']:+.2f})")
        pooled.scatter(x, y, s=14, label=label)
        bound.scatter([r["test_mse"] for r in sub], [r["bound"] for r in sub], s=14, label=label)
    w = main["pooled"]
    within.set(title=f"within structures: r={w['r']:+.2f} [{w['ci95'][0]:+.2f}, {w['ci95'][1]:+.2f}] (n={w['n']})",
               xlabel="normalized edit distance - structure mean", ylabel="normalized d_eff - structure mean")
    labels = list(main["per_structure"])
    values = [main["per_structure"][k] for k in labels]
    per_structure.errorbar([v["r"] for v in values], np.arange(len(values)), fmt="o",
                           xerr=np.abs(np.array([v["ci95"] for v in values]).T - [v["r"] for v in values]))
    per_structure.axvline(0, color="k", lw=0.8)
    per_structure.set_yticks(np.arange(len(values)), labels, fontsize=7)
    per_structure.set(title="r per structure (router seeds only), 95% CI", xlabel="Pearson r")
    pooled.set(title="all runs pooled (structures differ too)", xlabel="normalized edit distance",
               ylabel="normalized d_eff = d_eff / n")
    lo = min(min(r["test_mse"], r["bound"]) for r in rows)
    hi = max(max(r["test_mse"], r["bound"]) for r in rows)
    bound.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="bound = test MSE")
    bound.set(title="bound vs measured test MSE", xlabel="test MSE (trained MoE)", ylabel="bound (C1 = 1)",
              xscale="log", yscale="log")
    for ax in (within, pooled, bound):
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_sweep(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> str:
    """The sweep of configs/verify_theory.py: every structure x router scale x router seed.

    Writes results.csv, results.json and theory.png to config.out; returns the correlation text."""
    base = SyntheticConfig.from_config(config.synthetic)
    structures = [(int(k), float(s)) for k in config.sweep.n_clusters for s in config.sweep.spreads]
    rows = sweep_synthetic(base, structures, range(config.sweep.router_seeds),
                           [float(s) for s in config.sweep.router_scales], mesh=mesh)
    corr = correlations(rows)
    os.makedirs(config.out, exist_ok=True)
    with open(os.path.join(config.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    strict_json.dump({"base_config": dataclasses.asdict(base), "runs": rows, "correlations": corr},
                     os.path.join(config.out, "results.json"), indent=1)
    save_plots(rows, corr, os.path.join(config.out, "theory.png"))
    return (f"Correlations over runs:\n{format_correlations(corr)}\n"
            f"wrote {config.out}/results.csv, results.json, theory.png")
