"""Qwen3-MoE, the second model family: tiny random Qwen3MoeForCausalLM checkpoints written by
transformers' save_pretrained are loaded through the same `load_hf`, match transformers' logits and
router logits, extract, run the pipeline end to end, convert, and split their experts over a mesh.
Also the family dispatch itself: an unknown model_type, "repo@revision", a missing local path."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from moe_grok import sharding  # noqa: E402  (after the skips: without torch the module skips cleanly)
from moe_grok.extraction.routing import extract_dataset, make_extractor  # noqa: E402
from moe_grok.model import families, hf  # noqa: E402
from moe_grok.model import params as model_lib  # noqa: E402
from moe_grok.model.checkpoint_io import convert_hf_checkpoint, restore_params  # noqa: E402
from moe_grok.model.errors import UnsupportedModelTypeError  # noqa: E402

from hf_reference import hf_outputs, padded_batch, save_hf_model, save_qwen3_moe_model  # noqa: E402

TOL = 1e-4
# One compiled forward per (config, shapes): tests running the same checkpoint layout share it.
_forward = jax.jit(model_lib.forward, static_argnums=0)
# Layer structures (3 layers): all MoE; layer 1 dense by mlp_only_layers; layers 0 and 2 dense by
# decoder_sparse_step 2 (transformers: layer i is MoE when (i + 1) % step == 0).
ALL_MOE = dict(norm_topk_prob=True)
MLP_ONLY = dict(mlp_only_layers=[1], norm_topk_prob=False)
SPARSE_STEP = dict(decoder_sparse_step=2, norm_topk_prob=True, tie_word_embeddings=True)


def _ours_and_reference(hf_model, model_config, params, tokens, mask):
    """({"logits", "router_logits"} of moe_grok and of transformers at the real (unpadded) positions."""
    ref_logits, ref_router = hf_outputs(hf_model, tokens, mask)
    out = _forward(model_config, params, jnp.asarray(tokens), jnp.asarray(mask))
    real = mask.astype(bool)
    ours = {"logits": np.asarray(out.logits, np.float64)[real], "router_logits": np.asarray(out.router_logits,
                                                                                            np.float64)[real]}
    return ours, {"logits": ref_logits[real], "router_logits": ref_router[real]}


@pytest.mark.parametrize("overrides, dense_layers", [(ALL_MOE, ()), (MLP_ONLY, (1,)), (SPARSE_STEP, (0, 2))],
                         ids=["all_moe", "mlp_only_layers", "decoder_sparse_step"])
def test_logits_and_router_logits_match_transformers(tmp_path, rng, overrides, dense_layers):
    hf_model = save_qwen3_moe_model(tmp_path, **overrides)
    model_config, params = hf.load_hf(str(tmp_path))
    assert (model_config.family, model_config.qk_norm, model_config.dense_layers) == (
        "qwen3_moe", "per_head", dense_layers)
    assert model_config.norm_topk_prob == overrides["norm_topk_prob"] and model_config.rope_theta == 5000.0
    assert params["layers"]["attn"]["q_norm"]["scale"].shape == (3, 16)  # per head: [L, head_dim]
    assert params["layers"]["moe"]["router"].shape == (3 - len(dense_layers), 32, 8)
    assert ("mlp" in params["layers"]) == bool(dense_layers)
    tokens, mask = padded_batch(rng)
    ours, reference = _ours_and_reference(hf_model, model_config, params, tokens, mask)
    # One router per MoE layer, as transformers' output_router_logits gives them.
    assert ours["router_logits"].shape == reference["router_logits"].shape == (mask.sum(), 3 - len(dense_layers), 8)
    chex.assert_trees_all_close(ours, reference, atol=TOL, rtol=0)


def test_hub_and_fused_expert_layouts_load_identically(tmp_path):
    """save_pretrained writes the hub layout (per-expert keys); transformers >= 5 holds the experts
    fused in memory (gate_up_proj [E, 2F, D], down_proj [E, D, F]): a file in that layout loads the same."""
    import safetensors.torch

    hf_model = save_qwen3_moe_model(tmp_path / "hub", **MLP_ONLY)
    with open(tmp_path / "hub" / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in header and "model.layers.1.mlp.gate_proj.weight" in header
    (tmp_path / "fused").mkdir()
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    safetensors.torch.save_file(state, str(tmp_path / "fused" / "model.safetensors"))
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    config_hub, params_hub = hf.load_hf(str(tmp_path / "hub"))
    config_fused, params_fused = hf.load_hf(str(tmp_path / "fused"))
    assert config_hub == config_fused
    chex.assert_trees_all_equal(params_hub, params_fused)


def test_renormalized_top_k_changes_the_output(tmp_path, rng):
    """norm_topk_prob is read and used: flipping it in our config moves the logits off transformers'."""
    hf_model = save_qwen3_moe_model(tmp_path, **MLP_ONLY)
    model_config, params = hf.load_hf(str(tmp_path))
    tokens, mask = padded_batch(rng)
    flipped, reference = _ours_and_reference(hf_model, model_config.replace(norm_topk_prob=True), params, tokens,
                                             mask)
    assert np.abs(flipped["logits"] - reference["logits"]).max() > 100 * TOL


def test_olmoe_full_width_and_qwen_per_head_norms_differ(tmp_path, rng):
    """The q/k norm switch matters: a Qwen3 checkpoint run with OLMoE's full-width norm fails to build
    (its scales are [head_dim], not [heads * head_dim]), so the switch cannot silently fall back."""
    save_qwen3_moe_model(tmp_path, **ALL_MOE)
    model_config, params = hf.load_hf(str(tmp_path))
    tokens, mask = padded_batch(rng)
    with pytest.raises(Exception, match="shape"):
        model_lib.forward(model_config.replace(qk_norm="full"), params, jnp.asarray(tokens), jnp.asarray(mask))


def test_extraction_counts_only_moe_layers(tmp_path, rng):
    hf_model = save_qwen3_moe_model(tmp_path, **MLP_ONLY)
    model_config, params = hf.load_hf(str(tmp_path))
    tokens, mask = padded_batch(rng)
    out = extract_dataset(model_config, params, tokens, mask, batch_size=2, progress=False)
    assert out["mean_weights"].shape == (3, model_config.num_moe_layers, 8) == (3, 2, 8)
    _, ref_router = hf_outputs(hf_model, tokens, mask)
    probs = np.exp(ref_router - ref_router.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("bsle,bs->ble", probs, mask) / mask.sum(1)[:, None, None]
    np.testing.assert_allclose(out["mean_weights"], expected, atol=TOL)
    assert np.isfinite(out["loss"]).all() and out["routing_entropy"].shape == (3, 2)


def test_convert_and_reload(tmp_path, rng):
    save_qwen3_moe_model(tmp_path / "hf", **SPARSE_STEP)
    model_config, params = hf.load_hf(str(tmp_path / "hf"))
    converted_config, count = convert_hf_checkpoint(str(tmp_path / "hf"), str(tmp_path / "ours"), dtype="float32")
    assert count == sum(x.size for x in jax.tree.leaves(params))
    restored_config, restored = restore_params(str(tmp_path / "ours"))
    assert restored_config == converted_config == model_config
    chex.assert_trees_all_equal(restored, params)
    tokens, mask = padded_batch(rng)
    chex.assert_trees_all_equal(_forward(restored_config, restored, tokens, mask),
                                _forward(model_config, params, tokens, mask))


@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_mesh")
    save_qwen3_moe_model(path, **MLP_ONLY)
    return path


@pytest.mark.parametrize("impl, mesh_shape", [("chunked", (2, 4)), ("ragged", (4, 2))])
def test_mesh_forward_equals_single_device(mixed_model, rng, impl, mesh_shape):
    model_config, params = hf.load_hf(str(mixed_model), moe_impl=impl)
    mesh = sharding.make_mesh(*mesh_shape)
    _, placed = hf.load_hf(str(mixed_model), moe_impl=impl, mesh=mesh)
    assert placed["experts"]["0"]["gate_proj"].sharding.spec[0] == sharding.EXPERT_AXIS
    tokens, mask = padded_batch(rng, batch=8)
    single = jax.jit(lambda p, t, m: model_lib.forward(model_config, p, t, m))(params, tokens, mask)
    batch = sharding.model_batch_sharding(mesh)
    multi = jax.jit(lambda p, t, m: model_lib.forward(model_config, p, t, m, mesh=mesh))(
        placed, jax.device_put(tokens, batch), jax.device_put(mask, batch))
    chex.assert_trees_all_close(multi, single, atol=1e-5)


def test_compiled_program_holds_only_its_experts(mixed_model):
    """As OLMoE's (test_expert_parallel): on a 4 x 2 mesh each device's program holds the expert
    stacks of its half of the experts, [L_moe, E/2, ...], and no full stack; with load_hf's
    per-layer expert arrays, each layer's half [E/2, out, in] and no full layer."""
    per_layer = hf.hf_model_config(str(mixed_model), moe_impl="chunked", expert_layout="per_layer")
    model_config = per_layer.replace(expert_layout="stacked")
    layers, e, d, f = (model_config.num_moe_layers, model_config.num_experts, model_config.hidden_size,
                       model_config.expert_intermediate_size)
    mesh = sharding.make_mesh(4, 2)
    shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          model_lib.param_shapes(model_config), model_lib.param_shardings(model_config, mesh))
    tokens = jax.ShapeDtypeStruct((16, 16), jnp.int32, sharding=sharding.model_batch_sharding(mesh))
    hlo = make_extractor(model_config, mesh).lower(shapes, tokens, tokens, tokens, tokens).compile().as_text()
    assert f"[{layers},{e // 2},{d},{f}]" in hlo and f"[{layers},{e // 2},{f},{d}]" in hlo
    for full in (f"[{layers},{e},{d},{f}]", f"[{layers},{e},{f},{d}]", f"[{e},{d},{f}]", f"[{e},{f},{d}]"):
        assert full not in hlo, f"a full expert stack {full} in the per-device program"
    shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          model_lib.param_shapes(per_layer), model_lib.param_shardings(per_layer, mesh))
    hlo = make_extractor(per_layer, mesh).lower(shapes, tokens, tokens, tokens, tokens).compile().as_text()
    assert f"[{e // 2},{f},{d}]" in hlo and f"[{e // 2},{d},{f}]" in hlo
    for full in (f"[{e},{d},{f}]", f"[{e},{f},{d}]"):
        assert full not in hlo, f"a layer's full experts {full} in the per-device program"


def test_pipeline_end_to_end_and_cached_rerun(tmp_path, monkeypatch):
    """The OLMoE experiment's launcher code (studies.olmoe_run) on Qwen3-MoE revisions with a dense
    layer; a second run reads every checkpoint's stats back from the cache (none is loaded again)."""
    import torch

    from moe_grok.report import plots
    from moe_grok.studies import olmoe_run

    from config_files import load_config
    from hf_reference import make_qwen3_moe_model

    steps = (1000, 2000, 3000)
    model = make_qwen3_moe_model(seed=0, **MLP_ONLY)
    final = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    for k, step in enumerate(steps):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(final[name] + 0.03 * (len(steps) - 1 - k) * torch.randn(p.shape, generator=generator))
        model.save_pretrained(str(tmp_path / f"step{step}"))
    rng = np.random.default_rng(0)
    for domain in ("math", "code"):
        with open(tmp_path / f"{domain}.jsonl", "w") as f:
            for _ in range(16):
                f.write(json.dumps({"input_ids": rng.integers(0, 96, rng.integers(3, 14)).tolist()}) + "\n")
    config = load_config("olmoe_grokking")
    config.checkpoints = ",".join(str(tmp_path / f"step{s}") for s in steps)
    config.dtype, config.moe_impl, config.batch_size = "float32", "dense", 8
    config.data.format, config.data.seq_len = "jsonl_ids", 16
    config.data.paths = f"{tmp_path / 'math.jsonl'},{tmp_path / 'code.jsonl'}"
    config.out_dir = str(tmp_path / "run")
    config.analysis.max_pairs, config.analysis.delta = 50, 0.3
    # Of the figures (most of a run's time here; test_olmoe_pipeline draws them all) the per-layer one is the one a
    # dense layer could break: it alone is drawn.
    monkeypatch.setattr(plots, "FIGURES", {"per_layer.png": plots.per_layer_figure})
    report = olmoe_run.run(config)
    assert report["steps"] == list(steps) and set(report["domains"]) == {"math", "code"}
    assert all(os.path.exists(tmp_path / "run" / "report" / name) for name in ("table1.csv", "per_layer.png"))
    assert not os.path.exists(tmp_path / "run" / "report" / "analysis.png")  # the other figures are not drawn
    cached = np.load(tmp_path / "run" / "cache" / f"step_{steps[-1]:010d}.npz")
    assert cached["router"].shape == (2, 8, 32)  # [L_moe, E, D]: the dense layer 1 does not route
    assert cached["train/mean_weights"].shape == (32, 2, 8)

    def refuse(*args, **kwargs):
        raise AssertionError("a cached checkpoint was loaded again")

    monkeypatch.setattr(hf, "load_hf", refuse)
    monkeypatch.setattr(plots, "FIGURES", {})  # the rerun checks the cache
    again = olmoe_run.run(config)
    assert json.dumps(again, default=float) == json.dumps(report, default=float)


def test_unknown_model_type_names_the_supported_families(tmp_path):
    save_hf_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "mixtral"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelTypeError, match=r"unsupported model_type 'mixtral'.*'olmoe' "
                                                        r"\(OlmoeForCausalLM\), 'qwen3_moe' \(Qwen3MoeForCausalLM\)"):
        hf.load_hf(str(tmp_path))
    with pytest.raises(UnsupportedModelTypeError, match="'olmoe'"):
        families.config_from_hf({"model_type": None})


def test_qwen3_settings_moe_grok_does_not_implement_are_refused():
    base = json.loads(json.dumps(_tiny_qwen3_dict()))
    for change, message in ((dict(use_sliding_window=True), "sliding_window"),
                            (dict(attention_bias=True), "attention_bias"),
                            (dict(hidden_act="gelu"), "hidden_act"),
                            (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope_type")):
        with pytest.raises(ValueError, match=message):
            families.config_from_hf({**base, **change})
    older = {key: value for key, value in base.items() if key != "num_local_experts"}  # transformers < 5 names
    assert families.config_from_hf({**older, "num_experts": 6}).num_experts == 6


def _tiny_qwen3_dict():
    from hf_reference import tiny_qwen3_moe_config

    return tiny_qwen3_moe_config().to_dict()
