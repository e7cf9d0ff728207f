"""Routing adapters of moe_grok.monitor: transformers MoE models (OLMoE, Mixtral, Qwen2-MoE with its
shared expert, Qwen3-MoE with dense layers) give exactly a direct softmax-and-mask of their router
logits, and the pathways, losses and router matrices of moe_grok's own extraction of the same
weights; a router of another kind is refused by name; a Flax MoE of this file's own, through the
sow convention, in layer order past "layers_9"."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
# The model classes at import: transformers loads each family's modeling module on first use.
from transformers import MixtralForCausalLM, OlmoeForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM  # noqa: E402

from moe_grok.analysis.pathways import layer_pathways, strings_of  # noqa: E402  (after the skips)
from moe_grok.extraction.routing import extract_dataset  # noqa: E402
from moe_grok.model import hf  # noqa: E402
from moe_grok.model import params as model_lib  # noqa: E402
from moe_grok.monitor import flax_routing, hf_routing  # noqa: E402

from hf_reference import _randomize, padded_batch, tiny_hf_config, tiny_qwen3_moe_config  # noqa: E402

SMALL = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
             max_position_embeddings=64, pad_token_id=1, eos_token_id=None, bos_token_id=None)


def _mixtral_config():
    return transformers.MixtralConfig(**SMALL, intermediate_size=24, num_hidden_layers=2, num_local_experts=8)


def _qwen2_moe_config():
    # Layer 1 dense: the router logits (and the arrays' layer axis) skip it.
    return transformers.Qwen2MoeConfig(**SMALL, intermediate_size=40, moe_intermediate_size=24,
                                       shared_expert_intermediate_size=24, num_hidden_layers=3, num_experts=8,
                                       mlp_only_layers=[1])


FAMILIES = {  # model_type -> (model class, config, MoE layers)
    "olmoe": (OlmoeForCausalLM, tiny_hf_config, 2),
    "mixtral": (MixtralForCausalLM, _mixtral_config, 2),
    "qwen2_moe": (Qwen2MoeForCausalLM, _qwen2_moe_config, 2),
    "qwen3_moe": (Qwen3MoeForCausalLM, lambda: tiny_qwen3_moe_config(mlp_only_layers=[1]), 2),
}


def _model(model_type):
    cls, config, _ = FAMILIES[model_type]
    torch.manual_seed(0)
    model = cls(config()).eval()
    _randomize(model)
    return model


def _run(model, tokens, mask):
    labels = np.where(mask != 0, tokens, hf_routing.IGNORE_INDEX)
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                     output_router_logits=True), labels


def _direct(router_logits, positions):
    """Token-mean softmax and its entropy over `positions`, in float64 numpy, layer by layer."""
    b, s = positions.shape
    logits = np.stack([np.asarray(layer, np.float64).reshape(b, s, -1) for layer in router_logits], axis=2)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    entropy = -(probs * np.log(probs)).sum(-1)
    weight = positions / positions.sum(1, keepdims=True)
    return np.einsum("bsle,bs->ble", probs, weight), np.einsum("bsl,bs->bl", entropy, weight)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_routing_equals_a_direct_softmax_and_mask(model_type, rng):
    moe_layers = FAMILIES[model_type][2]
    model = _model(model_type)
    assert model.config.model_type == model_type
    tokens, mask = padded_batch(rng)
    out, labels = _run(model, tokens, mask)
    assert len(out.router_logits) == moe_layers
    scored = hf_routing.scored_positions_from_labels(labels)
    got = hf_routing.routing_from_hf(out.router_logits, torch.as_tensor(mask), model_type=model_type,
                                     scored_mask=scored)
    weights, entropy = _direct(out.router_logits, mask)
    scored_weights, scored_entropy = _direct(out.router_logits, scored)
    assert got["mean_weights"].shape == (3, moe_layers, 8) and got["mean_weights"].dtype == np.float32
    np.testing.assert_allclose(got["mean_weights"], weights, atol=1e-6)
    np.testing.assert_allclose(got["routing_entropy"], entropy, atol=1e-5)
    np.testing.assert_allclose(got["scored_mean_weights"], scored_weights, atol=1e-6)
    np.testing.assert_allclose(got["scored_routing_entropy"], scored_entropy, atol=1e-5)
    # Padding matters: the real-token means differ from the all-token ones for the padded rows.
    assert np.abs(_direct(out.router_logits, np.ones_like(mask))[0][1:] - weights[1:]).max() > 1e-3
    router = hf_routing.router_matrices_from_hf(model)
    gate = model.model.layers[-1].mlp.gate.weight.detach().numpy()
    assert router.shape == (moe_layers, 8, 32)
    np.testing.assert_array_equal(router[-1], gate)


@pytest.mark.parametrize("model_type", ["olmoe", "qwen3_moe"])
def test_pathways_losses_and_routers_equal_moe_grok_extraction(model_type, tmp_path, rng):
    """The same weights read by load_hf and run by moe_grok's extraction: equal pathway strings, router
    weights, entropies, losses and correctness within float32 noise, equal router matrices."""
    model = _model(model_type)
    model.save_pretrained(str(tmp_path))
    model_config, params = hf.load_hf(str(tmp_path), moe_impl="dense")  # the cheapest kernel to compile
    tokens, mask = padded_batch(rng, batch=6, seq=12)
    mask[4, 9:] = 0
    ours = extract_dataset(model_config, params, tokens, mask, batch_size=6, progress=False)
    out, labels = _run(model, tokens, mask)
    got = hf_routing.routing_from_hf(out.router_logits, mask, model_type=model_type,
                                     scored_mask=hf_routing.scored_positions_from_labels(labels))
    for field in ("mean_weights", "scored_mean_weights"):
        np.testing.assert_allclose(got[field], ours[field], atol=2e-6)
        assert strings_of(layer_pathways(got[field])) == strings_of(layer_pathways(ours[field]))
    for field in ("routing_entropy", "scored_routing_entropy"):
        np.testing.assert_allclose(got[field], ours[field], atol=2e-5)
    assert len(set(strings_of(layer_pathways(ours["mean_weights"])))) > 1  # the samples' pathways differ
    loss, correct = hf_routing.per_sample_loss_from_hf(out.logits, torch.as_tensor(labels))
    np.testing.assert_allclose(loss, ours["loss"], rtol=1e-5)
    np.testing.assert_allclose(correct, ours["correct"], atol=1e-6)
    np.testing.assert_allclose(hf_routing.router_matrices_from_hf(model.state_dict(), model_type),
                               model_lib.router_matrices(params), atol=0)


def test_unsupported_routers_are_refused_by_name():
    logits = (np.zeros((6, 8), np.float32),)
    with pytest.raises(hf_routing.UnsupportedRouterError, match="deepseek_v3.*sigmoid.*'olmoe'.*'qwen3_moe'"):
        hf_routing.routing_from_hf(logits, np.ones((2, 3)), model_type="deepseek_v3")
    with pytest.raises(hf_routing.UnsupportedRouterError, match="'gpt_oss'.*not known.*'mixtral'"):
        hf_routing.router_matrices_from_hf({"model.layers.0.mlp.router.weight": logits[0]}, "gpt_oss")
    with pytest.raises(ValueError, match="output_router_logits=True"):
        hf_routing.routing_from_hf((), np.ones((2, 3)), model_type="olmoe")
    with pytest.raises(ValueError, match=r"layer 0 have shape \(6, 8\).*\[8, 8\]"):
        hf_routing.routing_from_hf(logits, np.ones((2, 4)), model_type="olmoe")
    with pytest.raises(ValueError, match="scored target ids"):  # a label outside the vocabulary
        hf_routing.per_sample_loss_from_hf(np.zeros((1, 3, 5)), np.array([[0, 7, 2]]))


def test_router_matrices_in_numeric_layer_order_from_either_key_layout():
    """Layer 10 after layer 2 (not as text); Mixtral's pre-transformers-5 key; Qwen2-MoE's shared-expert gate
    and a dense layer's gate_proj are no routers."""
    gate = {layer: np.full((4, 3), layer, np.float32) for layer in (2, 10)}
    state = {"model.layers.10.block_sparse_moe.gate.weight": gate[10], "model.layers.2.mlp.gate.weight": gate[2],
             "model.layers.2.mlp.shared_expert_gate.weight": np.ones((1, 3)),
             "model.layers.3.mlp.gate_proj.weight": np.ones((5, 3))}
    np.testing.assert_array_equal(hf_routing.router_matrices_from_hf(state, "mixtral"), np.stack([gate[2], gate[10]]))
    with pytest.raises(ValueError, match="model_type is needed"):
        hf_routing.router_matrices_from_hf(state)


# ----------------------------------------------------------------------------------------
# A Flax MoE of this test's own, following the sow convention of moe_grok.monitor.flax_routing
# ----------------------------------------------------------------------------------------
class _MoELayer(nn.Module):
    experts: int

    @nn.compact
    def __call__(self, x):
        logits = nn.Dense(self.experts, use_bias=False, name="router")(x)  # [batch, seq, experts]
        self.sow("intermediates", "router_logits", logits)
        probs = jax.nn.softmax(logits, axis=-1)
        outputs = jnp.tanh(nn.DenseGeneral((self.experts, x.shape[-1]), name="experts")(x))  # [B, S, E, D]
        return x + jnp.einsum("bse,bsed->bsd", probs, outputs)


class _TinyMoE(nn.Module):
    layers: int = 11  # past 10: "layers_10" sorts before "layers_2" as text
    experts: int = 4

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(16, 8)(tokens)
        for index in range(self.layers):
            x = _MoELayer(self.experts, name=f"layers_{index}")(x)
        return x


def test_flax_convention_in_layer_order(rng):
    model = _TinyMoE()
    tokens, mask = padded_batch(rng, vocab=16)
    # Random params without running init (which costs more than the test's forward).
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]
    params = jax.tree.map(lambda leaf: rng.normal(size=leaf.shape).astype(np.float32), shapes)
    # Through jit, as a training loop returns it, the collection's keys come back sorted as text.
    _, state = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["intermediates"]))(params, tokens)
    assert list(state["intermediates"])[:3] == ["layers_0", "layers_1", "layers_10"]
    scored = mask.copy()
    scored[:, 0] = 0
    got = flax_routing.routing_from_flax(state, mask, scored_mask=scored)
    sown = [state["intermediates"][f"layers_{i}"]["router_logits"][0] for i in range(11)]
    weights, entropy = _direct(sown, mask)
    np.testing.assert_allclose(got["mean_weights"], weights, atol=1e-6)
    np.testing.assert_allclose(got["routing_entropy"], entropy, atol=1e-5)
    np.testing.assert_allclose(got["scored_mean_weights"], _direct(sown, scored)[0], atol=1e-6)
    router = flax_routing.router_matrices_from_flax({"params": params})
    np.testing.assert_array_equal(router, np.stack([params[f"layers_{i}"]["router"]["kernel"].T for i in range(11)]))
    # Probabilities sown instead of logits give the same arrays; explicit layer paths override the order.
    probs = {f"layers_{i}": {"router_probs": (jax.nn.softmax(x, axis=-1),)} for i, x in enumerate(sown)}
    from_probs = flax_routing.routing_from_flax(probs, mask)
    np.testing.assert_allclose(from_probs["mean_weights"], got["mean_weights"], atol=1e-6)
    scanned = {"layers": {"router_logits": (jnp.stack(sown),)}}  # nn.scan's one leaf [layers, batch, seq, experts]
    np.testing.assert_array_equal(flax_routing.routing_from_flax(scanned, mask)["mean_weights"], got["mean_weights"])
    reverse = [f"layers_{i}" for i in reversed(range(11))]
    flipped = flax_routing.routing_from_flax(state, mask, layer_paths=reverse)
    np.testing.assert_allclose(flipped["mean_weights"], got["mean_weights"][:, ::-1], atol=1e-7)
    with pytest.raises(ValueError, match="sowed 2 values"):
        flax_routing.routing_from_flax({"layers_0": {"router_logits": (sown[0], sown[0])}}, mask)
    with pytest.raises(ValueError, match="self.sow"):
        flax_routing.routing_from_flax({"layers_0": {"logits": (sown[0],)}}, mask)
