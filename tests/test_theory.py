"""Routing kernel, NTKs, effective dimension and bound (moe_grok.theory) against numpy references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_grok import strict_json
from moe_grok.theory import kernels as theory
from moe_grok.theory.synthetic_data import make_cluster_data
from moe_grok.theory.synthetic_model import OneLayerMoE, ReluExperts, expert_ntk_gram, init_moe
from moe_grok.theory.synthetic_training import train_experts


# ----------------------------------------------------------------------------- numpy references
def relu_ntk_numpy(x, x2, train_output=True):
    """Independent float64 arc-cosine NTK (same parameterization as theory.relu_ntk)."""
    x, x2 = np.asarray(x, np.float64), np.asarray(x2, np.float64)
    inner = x @ x2.T
    norms = np.linalg.norm(x, axis=1)[:, None] * np.linalg.norm(x2, axis=1)[None, :]
    theta = np.arccos(np.clip(inner / norms, -1, 1))
    kernel = inner * (np.pi - theta) / (2 * np.pi)
    if train_output:
        kernel += norms * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi)
    return kernel / x.shape[1]


def per_neuron_ntk_terms(x, hidden, output, train_output=True):
    """Exact finite-width NTK of f(x) = m^-1/2 sum_r a_r relu(w_r.x/sqrt(d)) split per neuron:
    [m, n, n] terms whose mean over neurons is the empirical NTK."""
    x, hidden, output = (np.asarray(a, np.float64) for a in (x, hidden, output))
    d = x.shape[1]
    pre = x @ hidden / math.sqrt(d)  # [n, m]
    on = (pre > 0).astype(np.float64)
    terms = np.einsum("ir,jr->rij", on * output, on * output) * (x @ x.T / d)[None]
    if train_output:
        terms += np.einsum("ir,jr->rij", np.maximum(pre, 0), np.maximum(pre, 0))
    return terms


def one_expert(params, x):
    """Scalar one-hidden-layer ReLU network; params {"hidden": [d, m], "output": [m]}."""
    d, m = params["hidden"].shape
    pre = jnp.dot(x, params["hidden"], precision=theory.HIGHEST) / math.sqrt(d)
    return jnp.dot(jax.nn.relu(pre), params["output"], precision=theory.HIGHEST) / math.sqrt(m)


def sample_inputs(n=6, d=5, seed=0):
    """Points with assorted norms and angles, including a near-parallel and an opposite pair."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, (n, 1))
    x[1] = 1.7 * x[0] + 0.05 * rng.standard_normal(d)
    x[2] = -0.8 * x[0]
    return x.astype(np.float32)


def random_psd(rng, n, rank=None, scale=1.0):
    basis = rng.standard_normal((n, rank or n))
    return (scale * basis @ basis.T / basis.shape[1]).astype(np.float32)


# ----------------------------------------------------------------------------- kernels
def test_relu_ntk_matches_numpy_and_is_symmetric_psd(rng):
    """float32 cos(theta) is off by a few ulp, and theta = arccos(cos) amplifies that near theta = 0
    (dtheta ~ sqrt(2 dcos) ~ 1e-3 rad), so the hidden-layer term (pi - theta)/(2 pi) on the
    diagonal can be ~2e-4 relative off the float64 reference; elsewhere 1e-5 holds."""
    x = rng.standard_normal((60, 10)).astype(np.float32)
    off_diagonal = ~np.eye(60, dtype=bool)
    for train_output in (True, False):
        kernel = np.asarray(theory.relu_ntk(x, train_output=train_output), np.float64)
        reference = relu_ntk_numpy(x, x, train_output)
        np.testing.assert_allclose(kernel[off_diagonal], reference[off_diagonal], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.diag(kernel), np.diag(reference), rtol=3e-4)
        assert np.abs(kernel - kernel.T).max() <= 1e-6 * np.abs(kernel).max()
        eigenvalues = np.linalg.eigvalsh(kernel)
        assert eigenvalues.min() >= -1e-5 * eigenvalues.max()


def test_routing_gram_is_symmetric_psd(rng):
    x = rng.standard_normal((80, 10)).astype(np.float32)
    gates = jax.nn.softmax(3 * rng.standard_normal((80, 16)), axis=-1)
    gram = np.asarray(theory.routing_relu_ntk_gram(gates, x, block_size=16), np.float64)
    assert np.abs(gram - gram.T).max() <= 1e-6 * np.abs(gram).max()
    eigenvalues = np.linalg.eigvalsh(gram)
    assert eigenvalues.min() >= -1e-5 * eigenvalues.max()


@pytest.mark.parametrize("train_output", [True, False])
def test_empirical_ntk_equals_exact_finite_width_formula(train_output):
    x = sample_inputs()
    keys = jax.random.split(jax.random.PRNGKey(1))
    params = {"hidden": jax.random.normal(keys[0], (5, 64)), "output": jax.random.normal(keys[1], (64,))}
    if train_output:
        kernel = theory.empirical_ntk(one_expert, params, x, batch_size=4)
    else:  # only the hidden layer trained: the output weights are closed over
        apply_hidden = lambda hidden, xb: one_expert({"hidden": hidden, "output": params["output"]}, xb)
        kernel = theory.empirical_ntk(apply_hidden, params["hidden"], x, batch_size=4)
    exact = per_neuron_ntk_terms(x, params["hidden"], params["output"], train_output).mean(0)
    np.testing.assert_allclose(np.asarray(kernel), exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("train_output", [True, False])
def test_analytic_ntk_is_wide_limit_of_empirical_ntk(train_output):
    """The empirical NTK is a mean of m i.i.d. per-neuron terms whose expectation is the analytic
    kernel, so each entry is off by ~ N(0, se^2), se = std(terms)/sqrt(m) (CLT). 6 se (two-sided
    p ~ 2e-9 per entry) plus float32 round-off is a tolerance a wrong kernel cannot meet: the
    other parameterization (hidden-only vs both layers) must fail it."""
    width, x = 32768, sample_inputs()
    keys = jax.random.split(jax.random.PRNGKey(2))
    params = {"hidden": jax.random.normal(keys[0], (5, width)), "output": jax.random.normal(keys[1], (width,))}
    if train_output:
        empirical = theory.empirical_ntk(one_expert, params, x)
    else:
        apply_hidden = lambda hidden, xb: one_expert({"hidden": hidden, "output": params["output"]}, xb)
        empirical = theory.empirical_ntk(apply_hidden, params["hidden"], x)
    empirical = np.asarray(empirical, np.float64)
    terms = per_neuron_ntk_terms(x, params["hidden"], params["output"], train_output)
    tolerance = 6 * terms.std(0) / math.sqrt(width) + 1e-4 * np.abs(empirical).max()

    analytic = np.asarray(theory.relu_ntk(x, train_output=train_output), np.float64)
    assert np.all(np.abs(empirical - analytic) <= tolerance)
    assert np.abs(empirical - analytic).max() <= 0.05 * np.abs(analytic).max()
    wrong = np.asarray(theory.relu_ntk(x, train_output=not train_output), np.float64)
    assert np.any(np.abs(empirical - wrong) > tolerance)


def test_moe_empirical_ntk_equals_routing_gram_of_expert_ntks(rng):
    """NTK of F = sum_j g_j f_j w.r.t. expert parameters (router frozen) = sum_j g_j g_j' K_j."""
    x = rng.standard_normal((10, 6)).astype(np.float32)
    model = OneLayerMoE(num_experts=4, width=8, router_scale=2.0)
    params = init_moe(model, 6, router_seed=3, expert_seed=4)
    router, experts = params["params"]["router"], params["params"]["experts"]
    moe_of_experts = lambda e, xb: model.apply({"params": {"router": router, "experts": e}}, xb)
    moe_kernel = theory.empirical_ntk(moe_of_experts, experts, x, batch_size=3)

    expert_kernels = jnp.stack([
        theory.empirical_ntk(one_expert, {"hidden": experts["hidden"][j], "output": experts["output"][j]}, x)
        for j in range(4)
    ])
    _, gates = model.apply(params, x, method=OneLayerMoE.routing)
    np.testing.assert_allclose(
        np.asarray(theory.routing_gram(gates, expert_kernels)), np.asarray(moe_kernel), rtol=1e-4, atol=1e-6
    )


@pytest.fixture(scope="module")
def wide_sparse_moe():
    """A 3-expert top-2 MoE, experts 8192 wide, on sample_inputs(): (model, params drawn N(0, 1) as
    init_moe draws them (numpy: no initializer to compile), x [6, 5])."""
    rng = np.random.default_rng(1)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    params = {"params": {"router": {"kernel": normal(5, 3)},
                         "experts": {"hidden": normal(3, 5, 8192), "output": normal(3, 8192)}}}
    return OneLayerMoE(num_experts=3, width=8192, router_scale=2.0, top_k=2), params, sample_inputs()


def test_moe_expert_ntk_gram_equals_jacrev_jacobian_product(wide_sparse_moe):
    """expert_ntk_gram = J J^T with J = jacrev of F w.r.t. the expert parameters (router frozen), at
    parameters moved away from their initialization (as after training); symmetric PSD."""
    model, params, x = wide_sparse_moe
    router = params["params"]["router"]
    moved = jax.tree.map(lambda p: p + 0.5 * jnp.sin(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)),
                         params["params"]["experts"])
    of_experts = lambda e, xb: model.apply({"params": {"router": router, "experts": e}}, xb)
    leaves = jax.tree.leaves(jax.jit(jax.jacrev(of_experts))(moved, x))
    j = np.concatenate([np.asarray(leaf, np.float64).reshape(len(x), -1) for leaf in leaves], axis=1)
    moved_params = {"params": {"router": router, "experts": moved}}
    gram = np.asarray(expert_ntk_gram(model, moved_params, x), np.float64)
    np.testing.assert_allclose(gram, j @ j.T, rtol=1e-4, atol=1e-5 * np.abs(gram).max())
    cross = np.asarray(expert_ntk_gram(model, moved_params, x[:2], x[2:]), np.float64)
    np.testing.assert_allclose(cross, (j @ j.T)[:2, 2:], rtol=1e-4, atol=1e-5 * np.abs(gram).max())
    np.testing.assert_array_equal(gram, gram.T)
    assert np.linalg.eigvalsh(gram).min() >= -1e-5 * np.abs(gram).max()


def test_moe_expert_ntk_gram_at_wide_init_approaches_the_analytic_routing_gram(wide_sparse_moe):
    """At initialization, width -> infinity, the MoE's empirical NTK -> (G G^T) * relu_ntk with the
    same (top-k) gates and scale (NTK parameterization, both layers trained); the hidden-layer-only
    kernel is not it."""
    model, params, x = wide_sparse_moe
    _, gates = model.apply(params, x, method=OneLayerMoE.routing)
    gate_products = np.asarray(gates, np.float64) @ np.asarray(gates, np.float64).T
    empirical = np.asarray(expert_ntk_gram(model, params, x), np.float64)
    analytic = gate_products * relu_ntk_numpy(x, x)  # = theory.routing_relu_ntk_gram, tested above
    wrong = gate_products * relu_ntk_numpy(x, x, train_output=False)
    assert np.abs(empirical - analytic).max() <= 0.05 * np.abs(analytic).max()
    assert np.abs(empirical - wrong).max() > 0.2 * np.abs(analytic).max()


# ----------------------------------------------------------------------------- blocking & sharding
def test_blocked_gram_equals_unblocked_and_reference(rng):
    n, m, experts, layers = 37, 23, 5, 3
    x, x2 = rng.standard_normal((n, 8)).astype(np.float32), rng.standard_normal((m, 8)).astype(np.float32)
    gates, gates2 = rng.dirichlet(np.ones(experts), n), rng.dirichlet(np.ones(experts), m)
    reference = (gates @ gates2.T) * relu_ntk_numpy(x, x2)
    for block_size in (None, 1, 8, 100):
        gram = theory.routing_relu_ntk_gram(gates, x, gates2, x2, block_size=block_size)
        np.testing.assert_allclose(np.asarray(gram), reference, rtol=1e-4, atol=1e-6)

    kernels = rng.standard_normal((experts, n, m))
    per_expert = np.einsum("ie,je,eij->ij", gates, gates2, kernels)
    for block_size in (None, 8):
        np.testing.assert_allclose(
            np.asarray(theory.routing_gram(gates, kernels, gates2, block_size=block_size)), per_expert,
            rtol=1e-4, atol=1e-5
        )
    from_rows = theory.routing_gram(gates, lambda r0, r1: kernels[:, r0:r1], gates2, block_size=8)
    np.testing.assert_allclose(np.asarray(from_rows), per_expert, rtol=1e-4, atol=1e-5)
    shared = theory.routing_gram(gates, kernels[0], gates2, block_size=8)
    np.testing.assert_allclose(np.asarray(shared), (gates @ gates2.T) * kernels[0], rtol=1e-4, atol=1e-5)

    weights, weights2 = rng.dirichlet(np.ones(experts), (n, layers)), rng.dirichlet(np.ones(experts), (m, layers))
    base = rng.standard_normal((layers, n, m))
    cases = {
        None: np.einsum("ile,jle->ij", weights, weights2),
        "shared": np.einsum("ile,jle->ij", weights, weights2) * base[0],
        "per_layer": np.einsum("ile,jle,lij->ij", weights, weights2, base),
    }
    for name, expected in cases.items():
        base_kernels = {None: None, "shared": base[0], "per_layer": base}[name]
        for block_size in (None, 8):
            gram = theory.multilayer_routing_gram(weights, base_kernels, weights2, block_size=block_size)
            np.testing.assert_allclose(np.asarray(gram), expected, rtol=1e-4, atol=1e-5, err_msg=str(name))


def test_mesh8_equals_single_device(mesh8, rng):
    n = 37  # not a multiple of 8: exercises row padding
    x = rng.standard_normal((n, 8)).astype(np.float32)
    gates = rng.dirichlet(np.ones(6), n)
    kernels = rng.standard_normal((6, n, n))
    weights = rng.dirichlet(np.ones(6), (n, 3))
    builders = {
        "relu_ntk": lambda **kw: theory.relu_ntk(x, block_size=3, **kw),
        "routing_relu_ntk_gram": lambda **kw: theory.routing_relu_ntk_gram(gates, x, block_size=3, **kw),
        "routing_gram": lambda **kw: theory.routing_gram(gates, kernels, block_size=3, **kw),
        "multilayer_routing_gram": lambda **kw: theory.multilayer_routing_gram(weights, kernels[:3], block_size=3,
                                                                               **kw),
        "empirical_ntk": lambda **kw: theory.empirical_ntk(
            one_expert, {"hidden": np.ones((8, 16), np.float32) * 0.3, "output": np.linspace(-1, 1, 16)}, x,
            batch_size=16, **kw),
    }
    for name, build in builders.items():
        single, sharded = np.asarray(build()), np.asarray(build(mesh=mesh8))
        assert sharded.shape == (n, n), name
        np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------- spectrum & bound
def test_effective_dimension_limits(rng):
    rank, n = 7, 40
    basis = np.linalg.qr(rng.standard_normal((n, rank)))[0] * rng.uniform(1.0, 3.0, rank)
    gram = (basis @ basis.T).astype(np.float32)  # rank 7, nonzero eigenvalues in [1, 9]
    spectrum = theory.kernel_spectrum(gram)
    lams = jnp.array([1e-3, 1e-2, 1e-1, 1.0, 1e2, 1e4, 1e9])
    d_eff = np.asarray(theory.effective_dimension(spectrum, lams))
    assert abs(d_eff[0] - rank) < 0.1  # lam -> 0: rank of H
    assert d_eff[-1] < 1e-6  # lam -> inf: 0
    assert np.all(np.diff(d_eff) < 0)
    full_rank = theory.effective_dimension(random_psd(rng, 30) + np.eye(30, dtype=np.float32), 1e-5)
    assert abs(float(full_rank) - 30) < 1e-3
    assert float(theory.effective_dimension(gram, 1.0)) == pytest.approx(float(d_eff[3]), rel=1e-6)


@pytest.mark.parametrize("outputs", [None, 3])
def test_bound_terms_match_numpy_solve(rng, outputs):
    n, lam, noise_std, delta, c1 = 30, 0.3, 0.2, 0.05, 2.0
    gram = random_psd(rng, n, rank=20, scale=2.0)
    y = rng.standard_normal(n if outputs is None else (n, outputs)).astype(np.float32)
    h, yy = gram.astype(np.float64), y.reshape(n, -1).astype(np.float64)
    shifted = h + lam * np.eye(n)
    first = np.linalg.solve(shifted, yy)
    bias = lam**2 / n * np.sum(first**2)  # y^T A^-2 y = |A^-1 y|^2 (A symmetric)
    d_eff = np.trace(np.linalg.solve(shifted, h))
    variance = noise_std**2 * d_eff / n
    confidence = noise_std**2 * np.log(1 / delta) / n

    bound = theory.generalization_bound(gram, y, lam, noise_std, delta, c1)
    expected = dict(bias=bias, variance=variance, confidence=confidence, total=c1 * bias + variance + confidence,
                    effective_dimension=d_eff)
    for name, value in expected.items():
        assert float(getattr(bound, name)) == pytest.approx(value, rel=1e-4), name
    assert float(theory.bias_term(gram, y, lam)) == pytest.approx(bias, rel=1e-4)
    assert float(theory.variance_term(gram, lam, noise_std)) == pytest.approx(variance, rel=1e-4)
    lams = jnp.array([0.1, lam, 3.0])
    bound = theory.generalization_bound(gram, y, lams, noise_std, delta)
    assert np.asarray(bound.bias)[1] == pytest.approx(bias, rel=1e-4)

    cross = rng.standard_normal((5, n)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(theory.kernel_ridge_predict(gram, y, cross, lam)),
        (cross @ first).reshape((5,) + y.shape[1:]), rtol=1e-3, atol=1e-4,
    )


def test_shared_routing_has_lower_effective_dimension_than_random_routing(rng):
    n, experts = 128, 16
    x = rng.standard_normal((n, 10)).astype(np.float32)
    shared = np.zeros((n, experts), np.float32)
    shared[:, 0] = 1.0  # every sample to the same expert: H = K
    random = np.eye(experts, dtype=np.float32)[rng.integers(experts, size=n)]  # same trace, random experts
    lam = 1.0  # ~ the mean diagonal of H
    d_shared = float(theory.effective_dimension(theory.routing_relu_ntk_gram(shared, x), lam))
    d_random = float(theory.effective_dimension(theory.routing_relu_ntk_gram(random, x), lam))
    assert d_random > 1.4 * d_shared


# ----------------------------------------------------------------------------- synthetic model
SMALL_TRAINING = dict(steps=60, learning_rate=1e-2)


def test_training_updates_experts_only_and_fits():
    data = make_cluster_data(0, dim=12, n_clusters=3, spread=0.3, n_train=32, n_test=8, noise_std=0.1)
    model = OneLayerMoE(num_experts=4, width=16)
    params = init_moe(model, 12, router_seed=0, expert_seed=1)
    trained, mses = train_experts(model, params, data.x_train, data.y_train, **SMALL_TRAINING)
    np.testing.assert_array_equal(trained["params"]["router"]["kernel"], params["params"]["router"]["kernel"])
    assert not np.allclose(trained["params"]["experts"]["hidden"], params["params"]["experts"]["hidden"])
    assert float(mses[-1]) < 0.2 * float(mses[0])
    assert ReluExperts(4, 16).apply({"params": trained["params"]["experts"]}, data.x_train).shape == (32, 4)


def test_within_structure_correlation_and_fisher_interval():
    from scipy import stats

    from moe_grok.studies.synthetic_theory import fisher_interval, within_structure

    rng = np.random.default_rng(0)
    rows = []
    for n_clusters, offset in ((2, 0.0), (4, 10.0)):  # structures differ by a large offset in both metrics
        for _seed in range(12):
            x = rng.normal()
            rows.append({"n_clusters": n_clusters, "spread": 1.0, "router_scale": 1.0, "a": offset + x,
                         "b": -offset + 0.8 * x + 0.3 * rng.normal()})
    result = within_structure(rows, "a", "b")
    xs = [np.array([r[k] for r in rows if r["n_clusters"] == c]) for c in (2, 4) for k in ("a", "b")]
    demeaned = [v - v.mean() for v in xs]
    expected = stats.pearsonr(np.concatenate(demeaned[0::2]), np.concatenate(demeaned[1::2])).statistic
    assert result["pooled"]["r"] == pytest.approx(expected) and result["pooled"]["r"] > 0.8
    assert stats.pearsonr([r["a"] for r in rows], [r["b"] for r in rows]).statistic < 0  # pooled runs: wrong sign
    low, high = result["pooled"]["ci95"]
    assert low < expected < high
    z_half = 1.959964 / np.sqrt(24 - 1 - 3)
    z = np.arctanh(expected)
    assert (low, high) == pytest.approx((np.tanh(z - z_half), np.tanh(z + z_half)))
    assert result["per_structure"]["K=2 spread=1.0 scale=1.0"]["n"] == 12
    assert all(np.isnan(fisher_interval(0.5, 3)))


def test_verify_theory_sweep_end_to_end(tmp_path):
    from moe_grok.studies import synthetic_theory

    from config_files import load_config

    config = load_config("verify_theory")
    config.out = str(tmp_path)
    # the shapes of test_training_updates_experts_only_and_fits: the compiled training step is shared
    config.synthetic.update(n_train=32, n_test=20, dim=12, num_experts=4, width=16, **SMALL_TRAINING)
    config.sweep.update(n_clusters=(2,), spreads=(0.5,), router_seeds=4)
    text = synthetic_theory.run_sweep(config)
    assert "edit_distance_normalized~d_eff_normalized" in text and "within structures r=" in text
    for name in ("results.csv", "results.json", "theory.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_run_synthetic_kernels_measures_one_training_with_each_kernel():
    from moe_grok.theory.synthetic_run import SyntheticConfig, run_synthetic, run_synthetic_kernels

    # the shapes of test_verify_theory_sweep_end_to_end: the compiled training step is shared
    config = SyntheticConfig(n_train=32, n_test=20, dim=12, num_experts=4, width=16, **SMALL_TRAINING)
    analytic, empirical = run_synthetic_kernels(config, ("analytic", "empirical"))
    assert analytic == run_synthetic(config)  # the default kernel's result is unchanged
    assert (analytic["kernel"], empirical["kernel"]) == ("analytic", "empirical")
    kernel_fields = {"kernel", "gram_trace_per_sample", "d_eff", "d_eff_normalized", "bias", "variance", "bound",
                     "krr_test_mse"}
    assert {k for k in analytic if analytic[k] != empirical[k]} <= kernel_fields
    assert empirical["gram_trace_per_sample"] != analytic["gram_trace_per_sample"]
    assert 0 < empirical["d_eff"] < config.n_train
    with pytest.raises(ValueError, match="unknown kernel"):
        run_synthetic_kernels(config, ("ntk",))


def test_theory_grid_cells_verdicts_reading_and_resume(tmp_path, monkeypatch):
    """Per (scale, top-k, kernel) cell: the registered verdict on the within-structure CI, the overall
    reading, cells.csv and the forest plot; a rerun reuses the finished combinations."""
    import csv

    from moe_grok.studies import synthetic_theory

    from config_files import load_config

    calls = []

    def fake_runs(config, kernels, mesh=None):  # b tracks a exactly for top-k 2, not at all for soft gates
        calls.append(config)
        noise = np.sin(7.0 * config.router_seed + config.n_clusters)
        return [{"n_clusters": config.n_clusters, "spread": config.spread, "router_scale": config.router_scale,
                 "top_k": config.top_k, "router_seed": config.router_seed, "kernel": kernel,
                 "edit_distance_normalized": float(config.router_seed) + config.n_clusters,
                 "d_eff_normalized": float(config.router_seed) if config.top_k else noise,
                 **{k: noise for k in ("edit_distance", "d_eff", "mean_pathway_experts", "bound", "test_mse",
                                       "krr_test_mse")}} for kernel in kernels]

    monkeypatch.setattr(synthetic_theory, "run_synthetic_kernels", fake_runs)
    config = load_config("verify_theory")
    config.out = str(tmp_path)
    config.sweep.update(n_clusters=(2, 4), spreads=(0.5,), router_seeds=6, router_scales=(4.0, 1.0), top_ks=(0, 2),
                        kernels=("analytic", "empirical"))
    text = synthetic_theory.run_sweep(config)
    assert len(calls) == 2 * 2 * 2 * 6  # structures x scales x top-k x seeds: one training for both kernels
    results = strict_json.loads((tmp_path / "results.json").read_text())
    verdicts = {(c["router_scale"], c["top_k"], c["kernel"]): c["verdict"] for c in results["cells"]}
    assert len(verdicts) == 8 and list(verdicts)[0] == (4.0, 0, "analytic")  # the config's order
    assert {v for k, v in verdicts.items() if k[1] == 2} == {"holds"}
    assert all(v.startswith("fails") for k, v in verdicts.items() if k[1] == 0)
    within = results["cells"][1]["correlations"][synthetic_theory.PRIMARY_PAIR]["within_structure"]["pooled"]
    assert (within["n"], within["df"], within["structures"]) == (12, 9, 2)
    empirical = "mixed: holds in scale 4, top-2, empirical; scale 1, top-2, empirical"
    assert results["reading"] == {"cells_holding": 4, "cells": 8, "overall": "regime-dependent",
                                  "input_specific_routing": "fails", "sparse_gates": "holds",
                                  "empirical_ntk": empirical}
    assert "regime-dependent" in text and "scale 4, top-2, analytic" in text
    with open(tmp_path / "cells.csv", newline="") as f:
        table = list(csv.DictReader(f))
    primary = [r for r in table if r["pair"] == synthetic_theory.PRIMARY_PAIR and r["scope"] == "within structures"]
    assert len(primary) == 8 and {r["verdict"] for r in primary if r["top_k"] == "2"} == {"holds"}
    assert (tmp_path / "theory_grid.png").stat().st_size > 0
    calls.clear()
    assert synthetic_theory.run_sweep(config) == text and not calls  # resumed: nothing re-run


def test_grid_reading_thresholds():
    from moe_grok.studies.synthetic_theory import cell_verdict, grid_reading

    assert [cell_verdict(ci) for ci in ([0.1, 0.5], [-0.1, 0.5], [-0.5, -0.1], [np.nan, np.nan])] == [
        "holds", "fails (CI includes 0)", "fails (opposite sign)", "n/a"]
    cell = lambda scale, top_k, kernel, verdict: {"router_scale": scale, "top_k": top_k, "kernel": kernel,
                                                  "label": f"{scale}/{top_k}/{kernel}", "verdict": verdict}
    grid = [cell(s, k, kern, "holds") for s in (1.0, 4.0, 16.0) for k in (0, 2) for kern in ("analytic", "empirical")]
    assert grid_reading(grid)["overall"] == "supported"
    grid[:3] = [{**c, "verdict": "fails (CI includes 0)"} for c in grid[:3]]
    assert grid_reading(grid)["overall"] == "supported"  # 9 of 12
    grid[3] = {**grid[3], "verdict": "fails (CI includes 0)"}
    assert grid_reading(grid)["overall"] == "regime-dependent"  # 8 of 12
    none = [{**c, "verdict": "fails (CI includes 0)"} for c in grid]
    none[-3:] = grid[-3:]
    assert grid_reading(none)["overall"] == "not supported"  # 3 of 12
