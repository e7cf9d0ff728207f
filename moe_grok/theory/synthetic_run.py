"""The paper's synthetic check of the routing-kernel theory (docs/method.md, "Theory").

Gaussian clusters in ``dim`` dimensions, a one-layer MoE of one-hidden-layer ReLU experts
whose router is random and FROZEN, experts trained with optax. One run measures, on the
training set only: pathway strings and their mean pairwise edit distance, the routing Gram
H, d_eff(lam) and the bound; then the test error after training. The kernel of H:
    "analytic"   the infinite-width arc-cosine NTK of the experts, (G G^T) * K_relu (at no
                 particular parameters: the same before and after training);
    "empirical"  the TRAINED model's NTK w.r.t. the expert parameters, J(x) . J(x'), J = dF/dtheta
                 after the training steps (``synthetic_model.expert_ntk_gram``).
``run_synthetic_kernels`` measures several kernels on one training (one result per kernel).

Model (theory/synthetic_model.py):
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

import dataclasses

import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from moe_grok.analysis.metrics import group_pathway_distance
from moe_grok.analysis.pathways import pathway_strings
from moe_grok.theory import kernels
from moe_grok.theory.synthetic_data import make_cluster_data
from moe_grok.theory.synthetic_model import OneLayerMoE, expert_ntk_gram, init_moe
from moe_grok.theory.synthetic_training import train_experts

KERNELS = ("analytic", "empirical")  # SyntheticConfig.kernel: infinite-width arc-cosine NTK, trained model's J J^T


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """One synthetic run. Cluster structure = (n_clusters, spread); spread is the within-cluster
    standard deviation relative to the unit-variance cluster centers."""

    dim: int = 100  # input dimensions
    n_clusters: int = 4  # Gaussian clusters (with spread: the data structure)
    spread: float = 0.5  # within-cluster std relative to the unit-variance cluster centers
    n_train: int = 200  # training samples (the kernel's n)
    n_test: int = 1000  # test samples
    noise_std: float = 0.1  # std of the label noise (y = label + noise); the bound's noise level
    num_experts: int = 16  # experts of the one MoE layer
    width: int = 128  # hidden ReLU units per expert (m)
    router_scale: float = 1.0  # router inverse softmax temperature (larger: sharper routing, shorter pathways)
    top_k: int = 0  # experts kept per sample in the forward pass (0 = soft routing over all experts)
    tau: float = 0.7  # pathway threshold: experts kept until their cumulative weight exceeds tau
    steps: int = 500  # expert training steps (the router stays frozen)
    learning_rate: float = 3e-3  # expert learning rate
    lam: float = 0.1  # ridge lambda of d_eff, the bound and kernel ridge regression
    ridge_training: bool = True  # train with the (lam/n)|theta - theta_init|^2 penalty that matches the bound's lam
    delta: float = 0.05  # the bound holds with probability 1 - delta
    c1: float = 1.0  # constant of the bound's bias term
    data_seed: int = 0  # cluster, sample and label seed
    router_seed: int = 0  # frozen router seed (the only thing that varies within a structure)
    expert_seed: int = 0  # expert initialization seed
    kernel: str = "analytic"  # the Gram H: "analytic" (infinite-width NTK) or "empirical" (trained MoE's J J^T)

    @classmethod
    def from_config(cls, config) -> SyntheticConfig:
        """From a config section holding every field (the verify_theory config's `synthetic`)."""
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


def run_synthetic(config: SyntheticConfig, mesh: Mesh | None = None) -> dict:
    """One synthetic run with ``config.kernel`` -> flat dict of measurements (floats / ints, JSON-serializable)."""
    return run_synthetic_kernels(config, (config.kernel,), mesh)[0]


def _kernel_measurements(gram, cross_gram, data, config: SyntheticConfig) -> dict:
    """d_eff, the bound and kernel ridge regression of one training Gram [n, n] and its test x train
    cross Gram [n_test, n]."""
    spectrum = kernels.kernel_spectrum(gram)
    bound = kernels.generalization_bound(spectrum, data.y_train, config.lam, config.noise_std, config.delta, config.c1)
    krr_test = kernels.kernel_ridge_predict(spectrum, data.y_train, cross_gram, config.lam)
    return {
        "gram_trace_per_sample": float(jnp.trace(gram) / config.n_train),
        "d_eff": float(bound.effective_dimension),
        "d_eff_normalized": float(bound.effective_dimension) / config.n_train,
        "bias": float(bound.bias),
        "variance": float(bound.variance),
        "confidence": float(bound.confidence),
        "bound": float(bound.total),
        "krr_test_mse": float(jnp.mean((krr_test - data.f_test) ** 2)),
    }


def run_synthetic_kernels(config: SyntheticConfig, kernel_names=KERNELS, mesh: Mesh | None = None) -> list[dict]:
    """One training of ``config``, measured with each kernel of ``kernel_names`` -> one result dict per
    kernel (``config`` with ``kernel`` replaced, then the measurements; the pathway and test-error
    fields are the same in all of them)."""
    unknown = [k for k in kernel_names if k not in KERNELS]
    if unknown:
        raise ValueError(f"unknown kernel(s) {unknown}; choose from {KERNELS}")
    data = make_cluster_data(
        config.data_seed, dim=config.dim, n_clusters=config.n_clusters, spread=config.spread,
        n_train=config.n_train, n_test=config.n_test, noise_std=config.noise_std,
    )
    model = OneLayerMoE(config.num_experts, config.width, config.router_scale, config.top_k)
    params = init_moe(model, config.dim, config.router_seed, config.expert_seed)

    probs, gates = model.apply(params, data.x_train, method=OneLayerMoE.routing)
    paths = pathway_strings(np.asarray(probs)[:, None, :], tau=config.tau)
    path_lengths = [len(p.split(",")) for p in paths]
    pathway_fields = {
        "edit_distance": group_pathway_distance(paths, level="char"),
        "edit_distance_normalized": group_pathway_distance(paths, level="char", normalized=True),
        "distinct_pathways": len(set(paths)),
        "mean_pathway_experts": float(np.mean(path_lengths)),
    }

    trained, _ = train_experts(
        model, params, data.x_train, data.y_train, steps=config.steps, learning_rate=config.learning_rate,
        ridge=config.lam if config.ridge_training else 0.0, mesh=mesh,
    )
    predict = lambda x: model.apply(trained, x) - model.apply(params, x)
    test_pred = predict(data.x_test)
    training_fields = {
        "train_mse": float(jnp.mean((predict(data.x_train) - data.y_train) ** 2)),
        "test_mse": float(jnp.mean((test_pred - data.f_test) ** 2)),
        "test_error_rate": float(jnp.mean(jnp.sign(test_pred) != data.f_test)),
    }

    results = []
    for name in kernel_names:
        if name == "analytic":
            _, test_gates = model.apply(params, data.x_test, method=OneLayerMoE.routing)
            gram = kernels.routing_relu_ntk_gram(gates, data.x_train, mesh=mesh)
            cross_gram = kernels.routing_relu_ntk_gram(test_gates, data.x_test, gates, data.x_train, mesh=mesh)
        else:
            gram = expert_ntk_gram(model, trained, data.x_train)
            cross_gram = expert_ntk_gram(model, trained, data.x_test, data.x_train)
        measured = _kernel_measurements(gram, cross_gram, data, config)
        krr_test_mse = measured.pop("krr_test_mse")
        results.append({**dataclasses.asdict(dataclasses.replace(config, kernel=name)), **pathway_fields, **measured,
                        **training_fields, "krr_test_mse": krr_test_mse})
    return results
