"""Expert parallelism on 8 simulated devices: the dispatch really splits tokens and experts.

Results equal single-device ones (no token dropped, however skewed the routing); the compiled
per-device programs hold no full expert stack and all-gather no weights (only tokens); and
per-device FLOPs fall as 1/devices. On a real accelerator with fewer devices
(MOE_GROK_TEST_PLATFORM), the meshes are cut to its devices (`mesh_devices.fit_mesh`).
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_grok import sharding
from moe_grok.config import toy
from moe_grok.extraction.routing import make_extractor
from moe_grok.model import dispatch
from moe_grok.model import params as model_lib

from mesh_devices import DEVICES, PLATFORM, fit_mesh, needs_devices


def _stacks(rng, layers, e, d, f):
    return [jnp.asarray(rng.normal(size=(layers, e) + s), jnp.float32) for s in ((d, f), (d, f), (f, d))]


def _router_probs(rng, t, e, k, skew):
    """A softmax whose logits favour experts 0..k-1 by `skew` (all on expert device 0 when large)."""
    logits = rng.normal(size=(t, e)) + skew * (np.arange(e) < k)
    return jax.nn.softmax(jnp.asarray(logits, jnp.float32))


def _place_dispatch_inputs(mesh, x, probs, stacks):
    tokens = sharding.model_batch_sharding(mesh)
    experts = NamedSharding(mesh, P(None, sharding.EXPERT_AXIS))
    return jax.device_put(x, tokens), jax.device_put(probs, tokens), [jax.device_put(w, experts) for w in stacks]


# k = 3 > 2 experts per device on the 1 x 8 mesh: each device's rows are sized for 2 of a token's 3.
_T, _D, _F, _E, _K, _LAYERS = 64, 16, 12, 16, 3, 3


@functools.cache
def _single_device_dispatch(impl, skew):
    """(inputs, the one-device output checked against the dense oracle): both meshes compare to it."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(_T, _D)), jnp.float32)
    probs = _router_probs(rng, _T, _E, _K, skew)
    select = functools.partial(jax.lax.top_k, k=_K)
    stacks = _stacks(rng, _LAYERS, _E, _D, _F)
    kwargs = {"max_chunk": 16, "granule": 8} if impl == "chunked" else {}
    single = jax.jit(lambda x, p, s, layer: dispatch.dispatch_experts(x, p, select, s, layer, impl, **kwargs))(
        x, probs, stacks, jnp.int32(1))
    expected = dispatch.experts_dense(x, *select(probs)[::-1], *(w[1] for w in stacks))
    np.testing.assert_allclose(np.asarray(single), np.asarray(expected), atol=1e-4, rtol=1e-5)
    return x, probs, stacks, single


@pytest.mark.parametrize("impl", ["chunked", "ragged", "dense"])
@pytest.mark.parametrize("skew", [0.0, 30.0])  # 30: every token picks experts 0..k-1
@pytest.mark.parametrize("mesh_shape", [fit_mesh(4, 2), fit_mesh(1, 8)])
def test_dispatch_equals_single_device(impl, skew, mesh_shape):
    k = _K
    x, probs, stacks, single = _single_device_dispatch(impl, skew)
    select = functools.partial(jax.lax.top_k, k=k)
    kwargs = {"max_chunk": 16, "granule": 8} if impl == "chunked" else {}
    layer = jnp.int32(1)
    mesh = sharding.make_mesh(*mesh_shape)
    run = jax.jit(lambda x, p, s, layer: dispatch.dispatch_experts(x, p, select, s, layer, impl, mesh, **kwargs))
    multi = run(*_place_dispatch_inputs(mesh, x, probs, stacks), layer)
    scale = float(np.abs(np.asarray(single)).max())
    np.testing.assert_allclose(np.asarray(multi), np.asarray(single), atol=1e-5 * scale, rtol=1e-5)
    if skew:  # every token on experts 0..k-1 (the first devices, full to their bound): nothing is lost
        assert int(jnp.max(select(probs)[1])) < k


def test_dispatch_gradients_equal_single_device():
    rng = np.random.default_rng(1)
    t, d, f, e, k, layers = 32, 8, 6, 8, 3, 2  # 2 experts per device < k: rows for 2 of each token's 3
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    probs = _router_probs(rng, t, e, k, 0.0)
    stacks = _stacks(rng, layers, e, d, f)
    kwargs = {"max_chunk": 8, "granule": 8}  # one size class: the VJP's loops compile quickly

    def loss(mesh):
        def fn(x, probs, *stacks):
            out = dispatch.dispatch_experts(x, probs, functools.partial(jax.lax.top_k, k=k), stacks, jnp.int32(1),
                                            "chunked", mesh, **kwargs)
            return jnp.sum(jnp.sin(out))

        return fn

    single = jax.jit(jax.grad(loss(None), argnums=(0, 1, 2, 3, 4)))(x, probs, *stacks)
    mesh = sharding.make_mesh(*fit_mesh(2, 4))
    x_p, probs_p, s_p = _place_dispatch_inputs(mesh, x, probs, stacks)
    multi = jax.jit(jax.grad(loss(mesh), argnums=(0, 1, 2, 3, 4)))(x_p, probs_p, *s_p)
    for a, b in zip(single, multi, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * float(np.abs(a).max()), rtol=1e-4)


@pytest.fixture(scope="module")
def toy_model():
    model_config = toy(vocab_size=64, num_layers=2, num_experts=8, num_experts_per_tok=2, hidden_size=32,
                       head_dim=8, expert_intermediate_size=48, max_seq_len=16)
    params = model_lib.init_params(model_config, jax.random.key(0))
    tokens = np.random.default_rng(2).integers(0, 64, (16, 16))
    return model_config, params, tokens


@pytest.mark.parametrize("impl, mesh_shape", [("chunked", fit_mesh(2, 4)), ("ragged", fit_mesh(4, 2))])
def test_model_forward_equals_single_device(toy_model, impl, mesh_shape):
    model_config, params, tokens = toy_model
    model_config = model_config.replace(moe_impl=impl, expert_chunk_size=16, expert_chunk_granule=4)
    mask = np.ones_like(tokens)
    mask[3, 9:] = 0
    single = jax.jit(lambda p, t, m: model_lib.forward(model_config, p, t, m))(params, tokens, mask)
    mesh = sharding.make_mesh(*mesh_shape)
    placed = jax.device_put(params, model_lib.param_shardings(model_config, mesh))
    batch = sharding.model_batch_sharding(mesh)
    multi = jax.jit(lambda p, t, m: model_lib.forward(model_config, p, t, m, mesh=mesh))(
        placed, jax.device_put(tokens, batch), jax.device_put(mask, batch))
    np.testing.assert_allclose(np.asarray(multi.logits), np.asarray(single.logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(multi.router_logits), np.asarray(single.router_logits), atol=1e-5)


def _compiled_extractor(model_config, mesh, batch, seq):
    shapes = model_lib.param_shapes(model_config)
    if mesh is not None:
        shardings = model_lib.param_shardings(model_config, mesh)
        shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32,
                                  sharding=None if mesh is None else sharding.model_batch_sharding(mesh))
    return make_extractor(model_config, mesh).lower(shapes, tokens, tokens, tokens, tokens).compile()


def _all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    shapes = []
    for match in re.finditer(r"= \(?([a-z0-9]+)\[([0-9,]*)\][^=]*? all-gather(?:-start)?\(", hlo):
        shapes.append(tuple(int(n) for n in match.group(2).split(",") if n))
    return shapes


@pytest.mark.parametrize("impl", ["chunked", "ragged"])
def test_compiled_program_holds_only_its_experts_and_gathers_no_weights(toy_model, impl):
    model_config, _, _ = toy_model
    model_config = model_config.replace(moe_impl=impl)
    layers, e, d, f = (model_config.num_layers, model_config.num_experts, model_config.hidden_size,
                       model_config.expert_intermediate_size)
    data, expert = fit_mesh(4, 2)
    if expert < 2:
        pytest.skip(f"needs 2 devices for an expert axis; the {PLATFORM} platform has {DEVICES}")
    mesh = sharding.make_mesh(data, expert)
    hlo = _compiled_extractor(model_config, mesh, 16, 16).as_text()
    # The per-device program's expert stacks are [L, E/expert, ...]; no buffer holds all E experts
    # (of all layers or of one), and every all-gather moves tokens, never weights.
    local = e // expert
    assert f"[{layers},{local},{d},{f}]" in hlo and f"[{layers},{local},{f},{d}]" in hlo
    for full in (f"[{layers},{e},{d},{f}]", f"[{layers},{e},{f},{d}]", f"[{e},{d},{f}]", f"[{e},{f},{d}]"):
        assert full not in hlo, f"a full expert stack {full} in the per-device program"
    gathered = _all_gather_shapes(hlo)
    assert gathered, "the expert-parallel dispatch all-gathers each expert group's tokens"
    tokens_per_group = 16 * 16 // data  # the batch's tokens in one data shard (= one expert group)
    for shape in gathered:
        assert shape[0] == tokens_per_group and (d not in shape[1:] or shape[1:] == (d,)), shape
        assert f not in shape, shape


@needs_devices(2)
def test_per_device_flops_fall_as_one_over_devices(toy_model):
    # The dense kernel's FLOPs are static (every local expert on every token of the expert group),
    # so XLA's cost analysis counts the real work; the chunked / ragged kernels' loops and
    # ragged_dot have data-dependent sizes that the cost analysis cannot see.
    model_config, _, _ = toy_model
    model_config = model_config.replace(moe_impl="dense", num_layers=1)
    flops = {}
    meshes = [fit_mesh(8, 1), fit_mesh(2, 4)]
    for mesh_shape in [None, *meshes]:
        mesh = None if mesh_shape is None else sharding.make_mesh(*mesh_shape)
        flops[mesh_shape] = _compiled_extractor(model_config, mesh, 16, 16).cost_analysis()["flops"]
    for data, expert in meshes:
        ratio = flops[data, expert] / flops[None]
        devices = data * expert
        assert 0.8 / devices < ratio < 1.25 / devices, ((data, expert), ratio)
