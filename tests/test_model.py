"""Model + conversion: exact parity with HF OlmoeForCausalLM, dispatch vs dense oracle, orbax, errors."""
import functools
import json
import os

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from moe_grok.config import MoEConfig, olmoe_1b_7b, toy
from moe_grok.model import dispatch, layers
from moe_grok.model import params as model_lib
from moe_grok.model.checkpoint_io import restore_params, save_params
from moe_grok.model.hf import CheckpointError, load_hf
from moe_grok.sharding import make_mesh
from moe_grok.training import losses

from hf_reference import hf_outputs, padded_batch, require_reference, save_hf_model
from mesh_devices import fit_mesh

TOL = 1e-4
# One compiled forward per (config, shapes), shared by the tests that run the same tiny checkpoint
# (the configs are static: equal configs hit the same cache entry).
_forward = jax.jit(model_lib.forward, static_argnums=0)


def _assert_parity(hf_model, config, params, tokens, mask):
    ref_logits, ref_router = hf_outputs(hf_model, tokens, mask)
    out = _forward(config, params, jnp.asarray(tokens), jnp.asarray(mask))
    real = mask.astype(bool)
    assert out.logits.shape == ref_logits.shape and out.router_logits.shape == ref_router.shape
    np.testing.assert_array_less(np.abs(np.asarray(out.logits) - ref_logits)[real].max(), TOL)
    np.testing.assert_array_less(np.abs(np.asarray(out.router_logits) - ref_router)[real].max(), TOL)


@pytest.mark.parametrize("overrides", [
    dict(),  # MHA, no renormalization
    dict(num_key_value_heads=2, norm_topk_prob=True),  # GQA + renormalized top-k
    dict(num_key_value_heads=1, clip_qkv=0.5, num_experts_per_tok=3),  # MQA + clipping
    dict(tie_word_embeddings=True, num_hidden_layers=3),
])
def test_logits_and_router_logits_match_hf(tmp_path, rng, overrides):
    hf_model = save_hf_model(tmp_path, **overrides)
    config, params = load_hf(str(tmp_path))
    tokens, mask = padded_batch(rng)
    _assert_parity(hf_model, config, params, tokens, mask)


@pytest.mark.parametrize("attention_impl", ["matmul", "elementwise"])
def test_both_attention_forms_match_hf(tmp_path, rng, attention_impl):
    """GQA, clipping and padding, each attention form forced whatever the sequence length."""
    hf_model = save_hf_model(tmp_path, num_key_value_heads=2, clip_qkv=0.5)
    config, params = load_hf(str(tmp_path))
    tokens, mask = padded_batch(rng)
    _assert_parity(hf_model, config.replace(attention_impl=attention_impl), params, tokens, mask)


def test_auto_attention_form_and_configs_saved_before_the_field():
    assert layers.resolve_attention_impl("auto", layers.ELEMENTWISE_ATTENTION_MAX_SEQ) == "elementwise"  # CPU
    assert layers.resolve_attention_impl("auto", layers.ELEMENTWISE_ATTENTION_MAX_SEQ + 1) == "matmul"
    assert layers.resolve_attention_impl("matmul", 4) == "matmul"
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        toy(vocab_size=8, attention_impl="flash")
    saved_before = json.loads(toy(vocab_size=8).to_json())
    del saved_before["attention_impl"]
    assert MoEConfig.from_json(json.dumps(saved_before)).attention_impl == "matmul"  # the form it ran with


def test_attention_forms_agree_in_gradients_and_bfloat16(tmp_path, rng):
    """The elementwise form is the matmul form up to float32 summation order (gradients), and
    rounds where it rounds in bfloat16 (attention outputs within a quarter bfloat16 step)."""
    save_hf_model(tmp_path, num_key_value_heads=2)
    tokens, mask = (jnp.asarray(a) for a in padded_batch(rng, seq=6))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    def layer0_attention(dtype):
        config, params = load_hf(str(tmp_path), dtype=dtype)
        hidden = jnp.asarray(rng.normal(size=(*tokens.shape, config.hidden_size)), dtype)
        return config, jax.tree.map(lambda a: a[0], params["layers"]["attn"]), hidden

    # Gradients of one attention layer (parameters and input) in float32: the forms differ by summation order.
    config, attention, hidden = layer0_attention(jnp.float32)
    probe = jnp.asarray(rng.normal(size=hidden.shape), jnp.float32) * mask[..., None]

    def gradients(attention_impl):
        module = layers.Attention(config.replace(attention_impl=attention_impl))
        loss = lambda p, h: jnp.sum(module.apply({"params": p}, h, positions, mask) * probe)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(attention, hidden)

    for ours, theirs in zip(jax.tree.leaves(gradients("elementwise")), jax.tree.leaves(gradients("matmul")),
                            strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4,
                                   atol=1e-5 * float(np.abs(np.asarray(theirs)).max()))
    config16, attention16, hidden16 = layer0_attention(jnp.bfloat16)
    out = {impl: np.asarray(layers.Attention(config16.replace(attention_impl=impl)).apply(
        {"params": attention16}, hidden16, positions, mask), np.float32)[np.asarray(mask, bool)]
        for impl in ("elementwise", "matmul")}
    bf16_step = 2.0 ** -7 * np.abs(out["matmul"]).max()  # one bfloat16 rounding step at the largest output
    # Equal on the CPUs measured; summing the scores in float32 without rounding them moves 0.64 steps.
    assert np.abs(out["elementwise"] - out["matmul"]).max() <= 0.25 * bf16_step


def test_sharded_index_and_fused_layouts_load_identically(tmp_path, rng):
    require_reference()
    import safetensors.torch

    hf_model = save_hf_model(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    fused_dir = tmp_path / "fused"  # transformers>=5 keeps experts fused in memory
    fused_dir.mkdir()
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    safetensors.torch.save_file(state, str(fused_dir / "model.safetensors"))
    (fused_dir / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    config_a, params_a = load_hf(str(tmp_path / "sharded"))
    config_b, params_b = load_hf(str(fused_dir))
    assert config_a == config_b
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
    tokens, mask = padded_batch(rng)
    _assert_parity(hf_model, config_b, params_b, tokens, mask)


def test_bfloat16_weights_run_and_stay_close(tmp_path, rng):
    save_hf_model(tmp_path)
    config32, params32 = load_hf(str(tmp_path))
    config16, params16 = load_hf(str(tmp_path), dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    tokens, mask = padded_batch(rng)
    out16 = _forward(config16, params16, jnp.asarray(tokens), jnp.asarray(mask))
    out32 = _forward(config32, params32, jnp.asarray(tokens), jnp.asarray(mask))
    assert out16.logits.dtype == jnp.bfloat16 and out16.router_logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(out16.logits, np.float32)).all()
    err = np.abs(np.asarray(out16.logits, np.float32) - np.asarray(out32.logits))[mask.astype(bool)]
    assert err.max() < 0.15 * np.abs(np.asarray(out32.logits)).max()


@pytest.mark.parametrize(("impl", "out_in"), [("chunked", False), ("chunked", True), ("ragged", False),
                                              ("ragged", True), ("batched", True)])
@pytest.mark.parametrize("skew", [0.0, 8.0])  # skew routes every token to expert 0
def test_dispatch_equals_dense_oracle(impl, out_in, skew):
    """out_in: weights stored [E, out, in] (expert_layout "per_layer"). The batched kernel runs its
    [E, C, D] block on the balanced routing and falls back to the chunk loops on the skewed one."""
    rng = np.random.default_rng(1)
    t, d, f, e, k = 67, 16, 12, 8, 3  # T*k not a multiple of the chunk size
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    logits = rng.normal(size=(t, e)) + skew * (np.arange(e) == 0)
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32))
    top_w, top_idx = jax.lax.top_k(probs, k)
    w = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
    expected = dispatch.experts_dense(x, top_idx, top_w, *w)
    if out_in:
        w = [jnp.swapaxes(a, 1, 2) for a in w]
    kwargs = {"max_chunk": 16, "granule": 4} if impl in ("chunked", "batched") else {}
    got = jax.jit(functools.partial(dispatch.EXPERT_IMPLS[impl], out_in=out_in, **kwargs))(x, top_idx, top_w, *w)
    np.testing.assert_allclose(np.asarray(dispatch.experts_dense(x, top_idx, top_w, *w, out_in=out_in)),
                               np.asarray(expected), rtol=1e-6, atol=1e-6 * float(np.abs(expected).max()))
    scale = float(np.abs(np.asarray(expected)).max())  # outputs reach ~1e2: float32 summation order
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6 * scale, rtol=1e-5)
    if skew:  # one expert takes every token: 5x its balanced share
        assert int(jnp.sum(top_idx == 0)) == t
    else:  # within the batched kernel's 2x of the balanced share: its [E, C, D] block ran
        assert np.bincount(np.asarray(top_idx).ravel()).max() <= 2 * t * k / e


# stacked: weights of 3 layers [L, E, ...], layer 1 in use; the batched kernel takes one layer's arrays.
@pytest.mark.parametrize(("impl", "stacked"), [("chunked", False), ("chunked", True), ("ragged", False),
                                               ("ragged", True), ("batched", False)])
def test_dispatch_gradients_match_dense(impl, stacked):
    rng = np.random.default_rng(2)
    t, d, f, e, k = 32, 8, 6, 4, 2
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    top_w, top_idx = jax.lax.top_k(jax.nn.softmax(jnp.asarray(rng.normal(size=(t, e)), jnp.float32)), k)
    lead = (3,) if stacked else ()
    w = [jnp.asarray(rng.normal(size=lead + s), jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
    layer = jnp.int32(1) if stacked else None

    def loss(impl, **kwargs):
        return lambda x, tw, *ws: jnp.sum(jnp.sin(dispatch.EXPERT_IMPLS[impl](x, top_idx, tw, *ws, layer=layer,
                                                                                **kwargs)))

    g_dense = jax.grad(loss("dense"), argnums=(0, 1, 2, 3, 4))(x, top_w, *w)
    kwargs = {"max_chunk": 8, "granule": 2} if impl in ("chunked", "batched") else {}
    if impl == "batched":  # weights [E, out, in], as the per-layer expert layout passes them to it
        kwargs["out_in"] = True
        w = [jnp.swapaxes(a, -1, -2) for a in w]
        g_dense = (*g_dense[:2], *(jnp.swapaxes(g, -1, -2) for g in g_dense[2:]))
    g_impl = jax.jit(jax.grad(loss(impl, **kwargs), argnums=(0, 1, 2, 3, 4)))(x, top_w, *w)
    for a, b in zip(g_dense, g_impl, strict=True):  # float32 summation order: gradients reach ~1e1
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(np.abs(a).max()), rtol=1e-3)
    if stacked:  # the other layers' weights get exactly zero gradient
        for g in g_impl[2:]:
            assert not np.asarray(g)[[0, 2]].any()


def test_bfloat16_chunked_weight_gradients_are_summed_in_float32():
    """Every token on one expert, 4096 rows in 64-row chunks: rounding the weight gradient to
    bfloat16 after each chunk would double its error against a float32 reference (1.1% vs 0.6%)."""
    rng = np.random.default_rng(0)
    t, d, f, e = 4096, 32, 32, 4
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    top_w, top_idx = jax.lax.top_k(jax.nn.softmax(jnp.asarray(rng.normal(size=(t, e)) + 30 * (np.arange(e) < 1),
                                                              jnp.float32)), 1)
    stacks = [jnp.asarray(rng.normal(size=(1, e) + s) / np.sqrt(s[0]), jnp.float32) for s in ((d, f), (d, f), (f, d))]
    cotangent = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)

    def weight_grads(kernel, dtype):
        def loss(*ws):
            out = kernel(x.astype(dtype), top_idx, top_w.astype(dtype), *ws, layer=jnp.int32(0))
            return jnp.sum(out.astype(jnp.float32) * cotangent)
        return [np.asarray(g, np.float32)[0, 0] for g in
                jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(w.astype(dtype) for w in stacks))]

    reference = weight_grads(dispatch.experts_dense, jnp.float32)
    chunked = functools.partial(dispatch.experts_chunked, max_chunk=64, granule=32)
    for kernel in (dispatch.experts_dense, chunked):
        errors = [np.linalg.norm(g - r) / np.linalg.norm(r) for g, r in
                  zip(weight_grads(kernel, jnp.bfloat16), reference, strict=True)]
        assert max(errors) < 0.008, (kernel, errors)  # bfloat16 inputs alone give ~0.6%


def _while_carry_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every while loop's carried arrays in a (closed) jaxpr, nested loops included."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            shapes += [tuple(v.aval.shape) for v in eqn.outvars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes += _while_carry_shapes(sub)
    return shapes


def test_vmapped_chunked_dispatch_runs_the_seeds_as_one_dispatch():
    """jax.vmap over stacked seeds' weights (and their own tokens and routing): the chunk loops run
    once over seeds x experts, with every seed's output and gradients as it gets them alone."""
    rng = np.random.default_rng(3)
    seeds, t, d, f, e, k, layers_ = 3, 40, 8, 6, 4, 2, 2
    x = jnp.asarray(rng.normal(size=(seeds, t, d)), jnp.float32)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(seeds, t, e)) + 2 * (np.arange(e) < 1), jnp.float32))
    top_w, top_idx = jax.lax.top_k(probs, k)  # seeds route differently (skewed toward expert 0)
    w = [jnp.asarray(rng.normal(size=(seeds, layers_, *s)), jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
    cotangent = jnp.asarray(rng.normal(size=(seeds, t, d)), jnp.float32)

    def loss(x, tw, idx, wg, wu, wdown, g):
        out = dispatch.experts_chunked(x, idx, tw, wg, wu, wdown, layer=jnp.int32(1), max_chunk=8, granule=2)
        return jnp.sum(jnp.sin(out) * g)

    value_and_grads = jax.value_and_grad(loss, argnums=(0, 1, 3, 4, 5))
    batched = jax.jit(jax.vmap(value_and_grads))(x, top_w, top_idx, *w, cotangent)
    for s in range(seeds):
        alone = jax.jit(value_and_grads)(x[s], top_w[s], top_idx[s], *(a[s] for a in w), cotangent[s])
        for got, expected in zip(jax.tree.leaves(batched), jax.tree.leaves(alone), strict=True):
            np.testing.assert_array_equal(np.asarray(got[s]), np.asarray(expected))
    rows = t * k + 8  # a seed's expert-sorted rows and the last chunk's slack
    carries = _while_carry_shapes(jax.make_jaxpr(jax.vmap(value_and_grads))(x, top_w, top_idx, *w, cotangent).jaxpr)
    assert (seeds * rows, d) in carries  # the seeds' rows merged into one loop carry
    assert not any(shape[:1] == (seeds,) and len(shape) > 1 for shape in carries)  # no loop runs per seed

def test_chunk_plan_by_hand():
    # Rows per expert [0, 5, 16, 33]; chunks of at most 16 rows, rounded up to 4.
    plan = dispatch.plan_chunks(jnp.asarray([0, 5, 16, 33]), 54, max_chunk=16, granule=4)
    assert int(plan.num_full) == 3  # expert 2 once, expert 3 twice
    np.testing.assert_array_equal(plan.full_expert[:3], [2, 3, 3])
    np.testing.assert_array_equal(plan.full_start[:3], [5, 21, 37])
    # Remainders: expert 3 has 1 row (class 1: 4 rows), expert 1 has 5 (class 2: 8 rows).
    bounds = np.asarray(plan.class_bounds)
    assert bounds[1] == 2 and bounds[2] == 3 and bounds[3] == bounds[-1] == 4
    np.testing.assert_array_equal(plan.rem_expert[2:], [3, 1])
    np.testing.assert_array_equal(plan.rem_start[2:], [53, 0])
    np.testing.assert_array_equal(plan.rem_valid[2:], [1, 5])


def test_load_balancing_loss_matches_hf(tmp_path, rng):
    require_reference()
    import torch
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    router = rng.normal(size=(3, 10, 2, 8)).astype(np.float32)
    _, mask = padded_batch(rng)
    ref = load_balancing_loss_func(tuple(torch.as_tensor(router[:, :, layer].reshape(-1, 8)) for layer in range(2)),
                                   8, 2, torch.as_tensor(mask))
    got = losses.load_balancing_loss(jnp.asarray(router), jnp.asarray(mask), 2)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
    z = losses.router_z_loss(jnp.asarray(router), jnp.asarray(mask))
    lse = np.log(np.exp(router).sum(-1)) ** 2
    np.testing.assert_allclose(float(z), lse[mask.astype(bool)].mean(), rtol=1e-5)


@pytest.fixture(scope="module")
def toy_model():
    """A toy config and its init_params (a compiled init): both orbax tests save it."""
    config = toy(vocab_size=20, num_layers=2)
    return config, model_lib.init_params(config, jax.random.key(0))


def test_orbax_round_trip(tmp_path, toy_model):
    config, params = toy_model
    save_params(str(tmp_path / "ckpt"), config, params)
    config2, params2 = restore_params(str(tmp_path / "ckpt"))
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    with pytest.raises(CheckpointError, match="not a moe_grok checkpoint"):
        restore_params(str(tmp_path))


def test_mesh_loading_and_forward_equal_single_device(tmp_path, rng):
    save_hf_model(tmp_path)
    config, params = load_hf(str(tmp_path))
    data, expert = fit_mesh(4, 2)
    mesh = make_mesh(data=data, expert=expert)
    _, sharded = load_hf(str(tmp_path), mesh=mesh)
    gate = sharded["experts"]["1"]["gate_proj"]  # the second MoE layer's experts [E, F, D]
    assert gate.sharding.spec[0] == "expert"
    assert gate.addressable_shards[0].data.shape[0] == config.num_experts // expert  # read directly into shards
    jax.tree.map(np.testing.assert_array_equal, params, sharded)
    tokens, mask = padded_batch(rng, batch=8)
    single = jax.jit(lambda p, t, m: model_lib.forward(config, p, t, m))(params, tokens, mask)
    from moe_grok.sharding import shard_batch
    multi = jax.jit(lambda p, t, m: model_lib.forward(config, p, t, m))(
        sharded, shard_batch(jnp.asarray(tokens), mesh), shard_batch(jnp.asarray(mask), mesh))
    np.testing.assert_allclose(np.asarray(multi.logits), np.asarray(single.logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(multi.router_logits), np.asarray(single.router_logits), atol=1e-5)


# --------------------------------------------------------------------------------------
# Bad input: each names its problem
# --------------------------------------------------------------------------------------
def _rewrite_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_model_type(tmp_path):
    save_hf_model(tmp_path)
    _rewrite_config(tmp_path, model_type="mixtral")
    with pytest.raises(ValueError, match="unsupported model_type 'mixtral'"):
        load_hf(str(tmp_path))


def test_shape_mismatch_with_config(tmp_path):
    save_hf_model(tmp_path)
    _rewrite_config(tmp_path, intermediate_size=48)
    with pytest.raises(CheckpointError, match=r"gate_proj.weight: shape \(24, 32\) does not match config"):
        load_hf(str(tmp_path))


def test_missing_and_unexpected_keys(tmp_path):
    require_reference()
    import safetensors.torch

    save_hf_model(tmp_path)
    state = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    state.pop("model.layers.1.mlp.gate.weight")
    state["model.layers.0.mlp.shared_expert.weight"] = state["model.norm.weight"].clone()
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\).*layers.1.mlp.gate.weight.*"
                                              r"1 unexpected key\(s\).*shared_expert"):
        load_hf(str(tmp_path))


def test_missing_files_and_unknown_repo(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "olmoe"}))
    with pytest.raises(CheckpointError, match="local directory; revision"):
        load_hf(str(tmp_path), revision="step1000-tokens4B")


def test_config_validation_and_presets():
    real = olmoe_1b_7b()
    assert (real.hidden_size, real.num_layers, real.num_experts, real.expert_intermediate_size) == (2048, 16, 64, 1024)
    # ~1.3B active parameters -> ~2.6 GFLOP/token forward without attention context
    assert 2.0e9 < real.active_flops_per_token(1) < 3.0e9
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        MoEConfig(vocab_size=8, hidden_size=8, num_layers=1, num_heads=3, num_kv_heads=2, head_dim=4,
                  num_experts=4, num_experts_per_tok=2, expert_intermediate_size=4)
    with pytest.raises(ValueError, match="num_experts_per_tok=5"):
        toy(vocab_size=8, num_experts_per_tok=5, num_experts=4)
    assert MoEConfig.from_json(real.to_json()) == real


def test_convert_cli_writes_a_restorable_checkpoint(tmp_path):
    import subprocess
    import sys

    save_hf_model(tmp_path / "hf")
    out = tmp_path / "orbax"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    launcher = os.path.join(os.path.dirname(__file__), "..", "experiments", "convert_checkpoint.py")
    result = subprocess.run([sys.executable, launcher, f"--hf_path={tmp_path / 'hf'}", f"--out={out}",
                             "--dtype=float32"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "parameters in float32" in result.stdout
    assert not result.stderr.strip(), f"the launcher should be quiet by default: {result.stderr[-2000:]}"
    config, params = restore_params(str(out))
    config_hf, params_hf = load_hf(str(tmp_path / "hf"))
    assert config == config_hf
    jax.tree.map(np.testing.assert_array_equal, params, params_hf)


def test_hub_repos_go_through_huggingface_hub(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    save_hf_model(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        if revision == "step1-tokens0B":
            raise FileNotFoundError("404: revision not found")  # stands in for the hub's error types
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    config, _ = load_hf("allenai/OLMoE-1B-7B-0924", revision="step245000-tokens1027B")
    assert calls == [("allenai/OLMoE-1B-7B-0924", "step245000-tokens1027B")] and config.num_experts == 8
    with pytest.raises(CheckpointError, match=r"could not fetch 'allenai/OLMoE-1B-7B-0924' at revision "
                                              r"'step1-tokens0B' from the hub: FileNotFoundError: 404"):
        load_hf("allenai/OLMoE-1B-7B-0924", revision="step1-tokens0B")


def test_repo_at_revision_goes_to_the_hub_as_repo_and_revision(tmp_path, monkeypatch):
    from moe_grok.model import hf

    calls = []

    def fake_download(repo, revision):
        calls.append((repo, revision))
        return str(tmp_path)

    monkeypatch.setattr(hf, "_download_snapshot", fake_download)
    assert hf.resolve_checkpoint_dir("allenai/OLMoE-1B-7B-0924@step245000-tokens1027B") == str(tmp_path)
    assert hf.resolve_checkpoint_dir("allenai/OLMoE-1B-7B-0924", revision="main") == str(tmp_path)
    assert hf.resolve_checkpoint_dir("allenai/OLMoE-1B-7B-0924@main", revision="main") == str(tmp_path)
    assert calls == [("allenai/OLMoE-1B-7B-0924", "step245000-tokens1027B"), ("allenai/OLMoE-1B-7B-0924", "main"),
                     ("allenai/OLMoE-1B-7B-0924", "main")]
    with pytest.raises(CheckpointError, match="names revision 'main', but revision='v2' was passed"):
        hf.resolve_checkpoint_dir("allenai/OLMoE-1B-7B-0924@main", revision="v2")
    with pytest.raises(CheckpointError, match="owner/name@revision"):
        hf.resolve_checkpoint_dir("allenai/OLMoE-1B-7B-0924@")
    local = tmp_path / "ckpt@step5"  # a local directory whose name holds "@" stays local
    local.mkdir()
    assert hf.resolve_checkpoint_dir(str(local)) == str(local) and len(calls) == 3


@pytest.mark.parametrize("path", ["/no/such/checkpoint", "./missing-ckpt", "runs/a/b", "~/missing-ckpt@step1"])
def test_a_missing_local_path_is_named_not_sent_to_the_hub(monkeypatch, path):
    from moe_grok.model import hf

    monkeypatch.setattr(hf, "_download_snapshot", lambda *args: pytest.fail("sent to the hub"))
    with pytest.raises(CheckpointError, match=f"checkpoint directory '{path}' does not exist"):
        load_hf(path)


def test_a_missing_path_under_an_existing_directory_is_local(tmp_path, monkeypatch):
    from moe_grok.model import hf

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()
    monkeypatch.setattr(hf, "_download_snapshot", lambda *args: pytest.fail("sent to the hub"))
    with pytest.raises(CheckpointError, match="'ckpts/step100' does not exist"):
        load_hf("ckpts/step100")


def test_configs_saved_before_model_families_read_as_olmoe():
    config = toy(vocab_size=8)
    saved_before = json.loads(config.to_json())
    for field in ("family", "qk_norm", "dense_layers", "dense_intermediate_size"):
        del saved_before[field]
    assert MoEConfig.from_json(json.dumps(saved_before)) == config
    assert (config.family, config.qk_norm, config.dense_layers) == ("olmoe", "full", ())
    assert config.moe_layers == (0, 1, 2, 3)
    # OLMoE's architecture (stored in stats caches) names no family field, as before families existed.
    assert set(config.architecture()) == {"vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                          "head_dim", "num_experts", "num_experts_per_tok",
                                          "expert_intermediate_size", "norm_topk_prob", "tie_word_embeddings"}
    mixed = config.replace(family="qwen3_moe", qk_norm="per_head", dense_layers=[1], dense_intermediate_size=16)
    assert mixed.dense_layers == (1,) and mixed.moe_layers == (0, 2, 3) and mixed.num_moe_layers == 3
    assert MoEConfig.from_json(mixed.to_json()) == mixed and hash(mixed)
    assert mixed.architecture()["dense_layers"] == [1] and mixed.architecture()["num_moe_layers"] == 3
    with pytest.raises(ValueError, match="dense_layers=.*must be distinct, increasing"):
        config.replace(dense_layers=(2, 1), dense_intermediate_size=16)
    with pytest.raises(ValueError, match="every layer is dense"):
        config.replace(dense_layers=(0, 1, 2, 3), dense_intermediate_size=16)
    with pytest.raises(ValueError, match="qk_norm='none'"):
        config.replace(qk_norm="none")


def test_mixed_layer_model_inits_trains_and_restores(tmp_path):
    """A model with dense layers from init_params (no checkpoint): the public tree, gradients
    through both branches of the per-layer switch, and the orbax round trip."""
    config = toy(vocab_size=20, num_layers=3, dense_layers=(1,), dense_intermediate_size=24, qk_norm="per_head",
                 family="qwen3_moe", expert_chunk_size=32, expert_chunk_granule=32)  # one chunk size: compiles faster
    params = model_lib.init_params(config, jax.random.key(0))
    assert params["layers"]["mlp"]["gate_proj"].shape == (1, 128, 24)
    assert params["layers"]["moe"]["router"].shape == (2, 128, 8)
    assert params["layers"]["moe"]["gate_proj"].shape == (2, 8, 128, 128)
    assert params["layers"]["attn"]["q_norm"]["scale"].shape == (3, 32)
    tokens = np.random.default_rng(0).integers(0, 20, (2, 6))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model_lib.forward(config, p, tokens).logits ** 2)))(params)
    for path in (("mlp", "down_proj"), ("moe", "router"), ("moe", "up_proj")):
        assert float(jnp.abs(grads["layers"][path[0]][path[1]]).max()) > 0, path
    save_params(str(tmp_path / "ckpt"), config, params)
    restored_config, restored = restore_params(str(tmp_path / "ckpt"))
    assert restored_config == config
    jax.tree.map(np.testing.assert_array_equal, params, restored)


def test_orbax_restore_reads_into_mesh_shards_and_casts(tmp_path, toy_model):
    config, params = toy_model
    save_params(str(tmp_path / "ckpt"), config, params)
    mesh = make_mesh(data=4, expert=2)
    config16, restored = restore_params(str(tmp_path / "ckpt"), mesh=mesh, dtype=jnp.bfloat16)
    assert config16 == config.replace(dtype="bfloat16")
    gate = restored["layers"]["moe"]["gate_proj"]
    assert gate.dtype == jnp.bfloat16 and gate.addressable_shards[0].data.shape[1] == config.num_experts // 2
    assert gate.sharding == model_lib.param_shardings(config16, mesh)["layers"]["moe"]["gate_proj"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b)),
                 params, restored)
