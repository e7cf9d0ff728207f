"""MoEConfig.expert_layout: per-layer [E, out, in] expert arrays with the layers unrolled compute
the stacked model's function; checkpoints written before the field restore, and migrate."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_grok.config import CONFIG_FILE, MoEConfig
from moe_grok.model import params as model_lib
from moe_grok.model.checkpoint_io import restore_params, save_params
from moe_grok.model.hf import load_hf

from hf_reference import save_hf_model

TINY = dict(vocab_size=20, hidden_size=16, num_layers=3, num_heads=2, num_kv_heads=2, head_dim=8, num_experts=4,
            num_experts_per_tok=2, expert_intermediate_size=12, expert_chunk_size=16, expert_chunk_granule=8)
_forward = jax.jit(model_lib.forward, static_argnums=0)
TOKENS = np.random.default_rng(0).integers(0, 20, (2, 9)).astype(np.int32)


@pytest.fixture(scope="module")
def stacked_model():
    """A tiny model in the "stacked" layout (what every checkpoint before per-layer experts holds)."""
    config = MoEConfig(**TINY)
    return config, model_lib.init_params(config, jax.random.key(0))


def _assert_same_outputs(config_a, params_a, config_b, params_b):
    a, b = _forward(config_a, params_a, TOKENS), _forward(config_b, params_b, TOKENS)
    np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(a.router_logits), np.asarray(b.router_logits), atol=1e-5)


def _write_checkpoint_before_expert_layouts(directory, config, params):
    """What save_params wrote before the expert_layout field: the stacked public tree, and a
    moe_config.json without the field."""
    assert config.expert_layout == "stacked"
    save_params(str(directory), config, params)
    path = directory / CONFIG_FILE
    fields = json.loads(path.read_text())
    del fields["expert_layout"]
    path.write_text(json.dumps(fields))


def test_checkpoint_written_before_expert_layouts_restores_and_migrates(tmp_path, stacked_model):
    config, params = stacked_model
    _write_checkpoint_before_expert_layouts(tmp_path / "old", config, params)
    as_saved_config, as_saved = restore_params(str(tmp_path / "old"))
    assert as_saved_config == config
    jax.tree.map(np.testing.assert_array_equal, as_saved, params)

    per_layer_config, per_layer = restore_params(str(tmp_path / "old"), expert_layout="per_layer")
    assert per_layer_config == config.replace(expert_layout="per_layer")
    assert "gate_proj" not in per_layer["layers"]["moe"]
    np.testing.assert_array_equal(per_layer["experts"]["2"]["down_proj"],  # [E, D, F] from [L, E, F, D]
                                  np.swapaxes(params["layers"]["moe"]["down_proj"][2], -1, -2))
    _assert_same_outputs(config, params, per_layer_config, per_layer)

    save_params(str(tmp_path / "new"), per_layer_config, per_layer)  # the layout is recorded beside the params
    assert json.loads((tmp_path / "new" / CONFIG_FILE).read_text())["expert_layout"] == "per_layer"
    back_config, back = restore_params(str(tmp_path / "new"), expert_layout="stacked")
    assert back_config == config
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_per_layer_forward_and_gradients_equal_the_stacked_scan():
    """Dense layers (each unrolled layer takes its own branch, no cond) and remat'd layers (the dense
    dispatch compiles fastest; the kernels equal it, test_model)."""
    config = MoEConfig(**{**TINY, "num_layers": 2}, dense_layers=(0,), dense_intermediate_size=10, remat_layers=True,
                       moe_impl="dense")
    params = model_lib.init_params(config, jax.random.key(1))
    per_layer_config, per_layer = model_lib.to_expert_layout(config, params, "per_layer")
    assert jax.tree.structure(per_layer) == jax.tree.structure(model_lib.param_shapes(per_layer_config))
    assert per_layer["experts"]["0"]["gate_proj"].shape == (4, 12, 16)  # the MoE layer (layer 1): [E, F, D]
    _assert_same_outputs(config, params, per_layer_config, per_layer)
    loss = lambda c: jax.jit(jax.grad(lambda p: jnp.sum(model_lib.forward(c, p, TOKENS).logits ** 2)))
    expected = model_lib.to_expert_layout(config, loss(config)(params), "per_layer")[1]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), loss(per_layer_config)(per_layer), expected)


def test_load_hf_builds_either_layout(tmp_path):
    save_hf_model(tmp_path)
    per_layer_config, per_layer = load_hf(str(tmp_path))
    stacked_config, stacked = load_hf(str(tmp_path), expert_layout="stacked")
    assert (per_layer_config.expert_layout, stacked_config.expert_layout) == ("per_layer", "stacked")
    assert stacked_config.settings() == {k: v for k, v in per_layer_config.settings().items() if k != "expert_layout"}
    jax.tree.map(np.testing.assert_array_equal, model_lib.to_expert_layout(stacked_config, stacked, "per_layer")[1],
                 per_layer)
