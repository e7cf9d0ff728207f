"""Bad checkpoints get a CheckpointError naming the file / checkpoint and key (issue #12 items 4, 6):
never a traceback from inside safetensors, json or XLA, and never silently different weights."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_grok.config import toy
from moe_grok.model import params as model_lib
from moe_grok.model.checkpoint_io import restore_params, save_params
from moe_grok.model.hf import INDEX_FILE, SINGLE_FILE, CheckpointError, load_hf

from hf_reference import hf_outputs, require_reference, save_hf_model

SHARD = "model-00002-of-00003.safetensors"
TINY = toy(vocab_size=20, num_layers=2, hidden_size=16, head_dim=4, expert_intermediate_size=16)
init_params = jax.jit(model_lib.init_params, static_argnums=0)  # the op-by-op init takes seconds, each call


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny checkpoint in 3 shards with an index (the hub's layout)."""
    path = tmp_path_factory.mktemp("sharded")
    save_hf_model(path, max_shard_size="90KB")
    assert sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))[-1] == "model-00003-of-00003.safetensors"
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _index(path):
    return json.loads((path / INDEX_FILE).read_text())


def _raises(path, *fragments, **kwargs) -> CheckpointError:
    """load_hf(path) raises a CheckpointError whose message holds every fragment, raised by moe_grok itself."""
    with pytest.raises(CheckpointError) as info:
        load_hf(str(path), **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    shown = info.value.__cause__ or (None if info.value.__suppress_context__ else info.value.__context__)
    assert shown is None, f"the traceback shows {shown!r} too"
    return info.value


def test_tied_checkpoint_that_also_stores_the_head_loads_like_transformers(tmp_path):
    require_reference()
    from safetensors.numpy import load_file, save_file
    from transformers import OlmoeForCausalLM

    save_hf_model(tmp_path, tie_word_embeddings=True)
    state = load_file(str(tmp_path / SINGLE_FILE))
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()  # stored, equal: still tied
    save_file(state, str(tmp_path / SINGLE_FILE), metadata={"format": "pt"})
    model_config, params = load_hf(str(tmp_path))
    tokens = np.array([[3, 7, 11, 2]])
    ours = np.asarray(jax.jit(lambda p: model_lib.forward(model_config, p, jnp.asarray(tokens)).logits)(params))
    theirs, _ = hf_outputs(OlmoeForCausalLM.from_pretrained(str(tmp_path)).eval(), tokens)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    # A stored head that differs from the embedding: transformers unties them; we name the conflict.
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    save_file(state, str(tmp_path / SINGLE_FILE), metadata={"format": "pt"})
    _raises(tmp_path, "ties the word embeddings, but lm_head.weight differs", "tie_word_embeddings to false")


def test_single_file_wins_over_an_index_like_transformers(sharded, tmp_path):
    require_reference()
    from transformers import OlmoeForCausalLM

    path = _copy(sharded, tmp_path / "both")
    other = save_hf_model(tmp_path / "other", seed=7)  # different weights as one model.safetensors
    shutil.copy(tmp_path / "other" / SINGLE_FILE, path / SINGLE_FILE)
    _, params = load_hf(str(path))
    theirs = OlmoeForCausalLM.from_pretrained(str(path)).state_dict()["model.layers.1.mlp.gate.weight"].numpy()
    np.testing.assert_array_equal(theirs, other.state_dict()["model.layers.1.mlp.gate.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(params["layers"]["moe"]["router"][1]).T, theirs)


def test_truncated_shard(sharded, tmp_path):
    path = _copy(sharded, tmp_path / "truncated")
    size = os.path.getsize(path / SHARD)
    with open(path / SHARD, "r+b") as f:
        f.truncate(size - 100)
    error = _raises(path, SHARD, "truncated: tensor")
    assert str(size - 100) in str(error)
    with open(path / SHARD, "r+b") as f:  # cut inside the header
        f.truncate(20)
    _raises(path, SHARD, "truncated or not a safetensors file")


def test_truncated_single_file(tmp_path):
    save_hf_model(tmp_path)
    with open(tmp_path / SINGLE_FILE, "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / SINGLE_FILE) // 2)
    _raises(tmp_path, SINGLE_FILE, "truncated")


def test_index_maps_a_key_to_the_wrong_shard(sharded, tmp_path):
    path = _copy(sharded, tmp_path / "wrong_shard")
    index = _index(path)
    key = next(k for k, name in index["weight_map"].items() if name == SHARD)
    index["weight_map"][key] = "model-00001-of-00003.safetensors"
    (path / INDEX_FILE).write_text(json.dumps(index))
    _raises(path, INDEX_FILE, f"maps '{key}' to model-00001-of-00003.safetensors, which does not hold it",
            f"({SHARD} does)")


def test_shard_missing_from_the_index_or_the_disk(sharded, tmp_path):
    path = _copy(sharded, tmp_path / "no_entries")
    index = _index(path)
    index["weight_map"] = {k: n for k, n in index["weight_map"].items() if n != SHARD}
    (path / INDEX_FILE).write_text(json.dumps(index))
    _raises(path, "missing key(s)")
    path = _copy(sharded, tmp_path / "no_file")
    os.remove(path / SHARD)
    _raises(path, f"names shard {SHARD}, which is missing from")


@pytest.mark.parametrize("text, fragments", [
    ('{"model_type": "olmoe",', ("config.json: invalid JSON in the model config (line 1",)),
    ("[1, 2]", ("config.json: the model config must be a JSON object",)),
])
def test_invalid_config_json(tmp_path, text, fragments):
    save_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(text)
    _raises(tmp_path, str(tmp_path / "config.json"), *fragments)


def test_config_without_num_experts(tmp_path):
    save_hf_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["num_experts"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    _raises(tmp_path, "config.json: missing key(s) ['num_experts']")


def test_nan_weights_name_the_checkpoint_and_key(tmp_path):
    require_reference()
    import torch

    model = save_hf_model(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["model.layers.1.mlp.experts.gate_up_proj"][3, 5, 2] = float("nan")  # expert 3's gate (rows 0..F-1)
    model.load_state_dict(state)
    model.save_pretrained(str(tmp_path))
    _raises(tmp_path, f"checkpoint {tmp_path}: non-finite (NaN/inf) weights in model.layers.1.mlp.experts.3.gate_proj",
            "experts/1/gate_proj")
    state["model.layers.1.mlp.experts.gate_up_proj"][3, 5, 2] = 0.0
    state["lm_head.weight"][0, 0] = float("inf")
    model.load_state_dict(state)
    model.save_pretrained(str(tmp_path))
    _raises(tmp_path, "lm_head.weight (lm_head/kernel)", dtype="bfloat16")
    del torch


@pytest.mark.parametrize("dtype", ["int8", "bool"])
def test_integer_and_bool_weights_are_refused_not_cast(tmp_path, dtype):
    require_reference()
    import safetensors.torch
    import torch

    save_hf_model(tmp_path)
    state = safetensors.torch.load_file(str(tmp_path / SINGLE_FILE))
    key = "model.layers.0.self_attn.q_proj.weight"
    state[key] = state[key].to(getattr(torch, dtype))
    safetensors.torch.save_file(state, str(tmp_path / SINGLE_FILE), metadata={"format": "pt"})
    _raises(tmp_path, f"{key} in {SINGLE_FILE} has dtype {'I8' if dtype == 'int8' else 'BOOL'}",
            "integer, bool and quantized tensors are not converted")


def test_orbax_checkpoint_with_nan_or_damage_names_the_directory(tmp_path):
    model_config = TINY
    params = init_params(model_config, jax.random.key(0))
    params["layers"]["moe"]["down_proj"] = params["layers"]["moe"]["down_proj"].at[1, 2, 0, 0].set(np.nan)
    save_params(str(tmp_path / "nan"), model_config, params)
    with pytest.raises(CheckpointError, match=r"nan: non-finite \(NaN/inf\) weights in layers/moe/down_proj "
                                              r"\(layer 1, expert 2\)"):
        restore_params(str(tmp_path / "nan"))
    params["layers"]["moe"]["down_proj"] = jnp.zeros_like(params["layers"]["moe"]["down_proj"])
    save_params(str(tmp_path / "damaged"), model_config, params)
    for root, _, files in os.walk(tmp_path / "damaged" / "params"):
        for name in files:
            if name != "_METADATA" and not name.startswith("_"):
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(3)
    with pytest.raises(CheckpointError, match="damaged.*cannot restore"):
        restore_params(str(tmp_path / "damaged"))


def test_checkpoints_in_orbax_default_layout_still_restore(tmp_path):
    import orbax.checkpoint as ocp

    model_config = TINY
    params = init_params(model_config, jax.random.key(0))
    model_config.save(str(tmp_path))  # what save_params wrote before: one OCDBT store
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(str(tmp_path / "params"), params)
    restored_config, restored = restore_params(str(tmp_path))
    assert restored_config == model_config
    jax.tree.map(np.testing.assert_array_equal, params, restored)
