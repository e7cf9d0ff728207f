"""Per-submodule parity with HF's OlmoeForCausalLM: each Flax module of moe_grok.model.layers, with
params from load_hf, against the matching HF submodule on the same input, so a regression names
the submodule (embeddings, RoPE, attention with q/k norm, the MoE block, a decoder layer, final norm)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers.masking_utils import create_causal_mask  # noqa: E402  (after the skips: collects without them)
from transformers.models.olmoe.modeling_olmoe import apply_rotary_pos_emb  # noqa: E402

from moe_grok.model import hf, layers  # noqa: E402

from hf_reference import save_hf_model  # noqa: E402

ATOL = 1e-5
BATCH, SEQ = 2, 7
LAYER = 1  # the second of two layers: a slicing bug that always reads layer 0 shows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(HF model, MoEConfig, params from load_hf, inputs) for one tiny random checkpoint (fp32)."""
    path = tmp_path_factory.mktemp("parity") / "ckpt"
    hf_model = save_hf_model(path, seed=3)
    model_config, params = hf.load_hf(str(path), dtype=jnp.float32)
    rng = np.random.default_rng(0)
    mask = np.ones((BATCH, SEQ), np.int32)
    mask[1, -2:] = 0  # right padding in the second row
    inputs = {"tokens": rng.integers(0, model_config.vocab_size, (BATCH, SEQ)).astype(np.int32), "mask": mask,
              "hidden": rng.normal(size=(BATCH, SEQ, model_config.hidden_size)).astype(np.float32),
              "positions": np.broadcast_to(np.arange(SEQ), (BATCH, SEQ))}
    return hf_model, model_config, params, inputs


def _torch(x):
    return torch.as_tensor(np.array(x))


def _hf_attention_inputs(hf_model, inputs):
    """What OlmoeModel.forward hands its layers: the hidden states, (cos, sin) and the causal mask."""
    hidden = _torch(inputs["hidden"])
    positions = _torch(inputs["positions"][:1]).long()
    # The cache argument is positional: newer transformers renamed it (past_key_values -> cache).
    mask = create_causal_mask(hf_model.config, hidden, _torch(inputs["mask"]), None, position_ids=positions)
    return hidden, hf_model.model.rotary_emb(hidden, positions), mask


def _layer_params(params, layer: int):
    """Layer `layer`'s params as DecoderLayer sees them (its experts come apart: `_experts`)."""
    per_layer = {name: value for name, value in params["layers"].items() if name != "moe"}
    return {**jax.tree.map(lambda a: a[layer], per_layer), "moe": {"router": params["layers"]["moe"]["router"][layer]}}


def _experts(params, layer: int):
    """(experts, layer) as SparseMoE takes them: load_hf's per-layer arrays of `layer` [E, out, in], no index."""
    return tuple(params["experts"][str(layer)][name] for name in layers.EXPERT_WEIGHTS), None


def _close(ours, theirs, real=None, what=""):
    """Equal within ATOL; `real` [B, S] restricts the comparison to real (unpadded) positions."""
    ours, theirs = np.asarray(ours, np.float64), theirs.detach().double().numpy()
    assert ours.shape == theirs.shape, what
    if real is not None:
        ours, theirs = ours[real.astype(bool)], theirs[real.astype(bool)]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL, err_msg=what)


def test_embeddings(models):
    hf_model, model_config, params, inputs = models
    embed = nn.Embed(model_config.vocab_size, model_config.hidden_size, dtype=model_config.jnp_dtype,
                     param_dtype=model_config.jnp_dtype)
    ours = embed.apply({"params": params["embed"]}, inputs["tokens"])
    with torch.no_grad():
        theirs = hf_model.model.embed_tokens(_torch(inputs["tokens"]).long())
    _close(ours, theirs, what="embeddings")


def test_rotary_embedding(models):
    hf_model, model_config, _, inputs = models
    heads = inputs["hidden"].reshape(BATCH, SEQ, model_config.num_heads, model_config.head_dim)
    ours = layers.rotary_embedding(heads, inputs["positions"], model_config.rope_theta)
    hidden, (cos, sin), _ = _hf_attention_inputs(hf_model, inputs)
    theirs, _ = apply_rotary_pos_emb(_torch(heads).transpose(1, 2), _torch(heads).transpose(1, 2), cos, sin)
    _close(ours, theirs.transpose(1, 2), what="RoPE")


@pytest.mark.parametrize("attention_impl", ["matmul", "elementwise"])
def test_attention_with_qk_norm(models, attention_impl):
    hf_model, model_config, params, inputs = models
    layer = LAYER
    ours = jax.jit(layers.Attention(model_config.replace(attention_impl=attention_impl)).apply)(
        {"params": _layer_params(params, layer)["attn"]}, inputs["hidden"], inputs["positions"], inputs["mask"])
    hidden, position_embeddings, mask = _hf_attention_inputs(hf_model, inputs)
    with torch.no_grad():
        theirs, _ = hf_model.model.layers[layer].self_attn(hidden, position_embeddings, mask)
    _close(ours, theirs, inputs["mask"], what=f"{attention_impl} attention, layer {layer}")


def test_moe_block(models):
    """Router logits and expert output of the sparse MoE block (this platform's default dispatch; the
    other kernels equal the dense oracle, test_model.test_dispatch_equals_dense_oracle)."""
    hf_model, model_config, params, inputs = models
    layer = LAYER
    ours, router_logits = jax.jit(layers.SparseMoE(model_config).apply)(
        {"params": _layer_params(params, layer)["moe"]}, inputs["hidden"], *_experts(params, layer))
    block = hf_model.model.layers[layer].mlp
    hidden = _torch(inputs["hidden"])
    with torch.no_grad():
        theirs_logits = block.gate(hidden)[0].reshape(BATCH, SEQ, -1)
        theirs = block(hidden)
    _close(router_logits, theirs_logits, what="router logits")
    _close(ours, theirs, what="MoE expert output")


def test_decoder_layer(models):
    """Norms, residuals and both blocks composed (the dense dispatch compiles fastest; test_moe_block
    covers this platform's default kernel)."""
    hf_model, model_config, params, inputs = models
    layer = LAYER
    ours, _ = jax.jit(layers.DecoderLayer(model_config.replace(moe_impl="dense")).apply)(
        {"params": _layer_params(params, layer)}, inputs["hidden"], inputs["positions"], inputs["mask"],
        *_experts(params, layer))
    hidden, position_embeddings, mask = _hf_attention_inputs(hf_model, inputs)
    with torch.no_grad():
        theirs = hf_model.model.layers[layer](hidden, attention_mask=mask, position_embeddings=position_embeddings,
                                              position_ids=_torch(inputs["positions"][:1]).long())
    _close(ours, theirs, inputs["mask"], what=f"decoder layer {layer}")


def test_final_norm(models):
    hf_model, model_config, params, inputs = models
    ours = layers.RMSNorm(model_config.rms_norm_eps, model_config.jnp_dtype).apply(
        {"params": params["final_norm"]}, inputs["hidden"])
    with torch.no_grad():
        theirs = hf_model.model.norm(_torch(inputs["hidden"]))
    _close(ours, theirs, what="final norm")
