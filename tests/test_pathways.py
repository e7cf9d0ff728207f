"""Pathway extraction: token means, threshold rule, string / token formats."""
import jax.numpy as jnp
import numpy as np
import pytest

from moe_grok.analysis.pathways import (
    LAYER_BOUNDARY,
    check_nonempty,
    layer_pathways,
    layer_strings_of,
    pathway_expert_lists,
    pathway_experts,
    pathway_lengths,
    pathway_string,
    pathway_strings,
    pathway_token_tuple,
    pathway_tokens,
    strings_of,
    token_mean_weights,
    tokens_of,
)


def reference_pathway(weights_LE, tau):
    """Plain-loop threshold rule on one sample."""
    result = []
    for layer in np.asarray(weights_LE, dtype=np.float64):
        order = sorted(range(len(layer)), key=lambda k: (-layer[k], k))
        kept, total = [], 0.0
        for expert in order:
            kept.append(expert)
            total += layer[expert]
            if tau < 1 and total > tau:
                break
        result.append(kept)
    return result


# --- token_mean_weights -------------------------------------------------------------------


def test_token_mean_weights_ignores_padding():
    probs = np.zeros((2, 3, 1, 2), np.float32)
    probs[0, :, 0] = [[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]]  # last token is padding
    probs[1, :, 0] = [[0.2, 0.8], [1.0, 0.0], [0.0, 1.0]]  # only the first token is real
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    got = token_mean_weights(jnp.asarray(probs), jnp.asarray(mask))
    assert got.shape == (2, 1, 2) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), [[[0.5, 0.5]], [[0.2, 0.8]]], rtol=1e-6)


def test_token_mean_weights_bfloat16_and_empty_sample():
    probs = jnp.full((2, 4, 3, 5), 0.2, jnp.bfloat16)
    mask = jnp.array([[1, 1, 1, 1], [0, 0, 0, 0]])
    got = np.asarray(token_mean_weights(probs, mask))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[0], np.full((3, 5), float(jnp.bfloat16(0.2))), rtol=1e-6)
    assert np.isnan(got[1]).all()


def test_token_mean_weights_shape_mismatch():
    with pytest.raises(ValueError, match=r"mask \[batch, seq\]"):
        token_mean_weights(jnp.ones((2, 3, 1, 4)), jnp.ones((2, 4)))


def test_check_nonempty_names_samples():
    check_nonempty(np.array([[1, 0], [0, 1]]))
    with pytest.raises(ValueError, match=r"indices \[1, 3\]"):
        check_nonempty(np.array([[1, 0], [0, 0], [1, 1], [0, 0]]))


# --- threshold rule -----------------------------------------------------------------------


def test_top_expert_alone_exceeding_tau():
    assert pathway_experts(np.array([[0.1, 0.75, 0.15]]), tau=0.7) == [[1]]


def test_cumulative_equal_to_tau_does_not_stop():
    # dyadic values: cumulative sums are exact; 0.5 + 0.25 == 0.75 is not > 0.75
    assert pathway_experts(np.array([[0.125, 0.5, 0.125, 0.25]]), tau=0.75) == [[1, 3, 0]]
    assert pathway_experts(np.array([[0.125, 0.5, 0.125, 0.25]]), tau=0.74) == [[1, 3]]


def test_rank_order_not_sorted_by_id():
    assert pathway_experts(np.array([[0.05, 0.3, 0.1, 0.55]]), tau=0.7) == [[3, 1]]


def test_tau_one_keeps_all_even_if_sum_rounds_above_one():
    weights = np.array([[0.6, 0.4000001, 0.0], [0.0, 0.3, 0.7]], np.float32)
    assert pathway_experts(weights, tau=1.0) == [[0, 1, 2], [2, 1, 0]]


def test_cumulative_never_exceeding_keeps_all():
    # sums to 0.9 < tau: keep every expert, in rank order
    assert pathway_experts(np.array([[0.2, 0.3, 0.4]]), tau=0.95) == [[2, 1, 0]]


def test_one_expert_per_layer():
    assert pathway_experts(np.ones((3, 1)), tau=0.7) == [[0], [0], [0]]


def test_ties_broken_by_lower_expert_id():
    assert pathway_experts(np.array([[0.25, 0.25, 0.25, 0.25]]), tau=0.6) == [[0, 1, 2]]
    assert pathway_experts(np.array([[0.1, 0.3, 0.3, 0.3]]), tau=0.5) == [[1, 2]]


def test_many_ties_agree_with_plain_loop(rng):
    counts = rng.integers(1, 4, size=(10, 3, 64)).astype(np.float64)  # few distinct values
    weights = counts / counts.sum(axis=-1, keepdims=True)
    assert pathway_expert_lists(weights, 0.5) == [reference_pathway(sample, 0.5) for sample in weights]


def test_batch_agrees_with_plain_loop(rng):
    weights = rng.dirichlet(np.full(16, 0.3), size=(20, 4)).astype(np.float32)
    for tau in (0.3, 0.5, 0.7, 0.8, 1.0):
        got = pathway_expert_lists(weights, tau)
        assert got == [reference_pathway(sample, tau) for sample in weights]


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5, float("nan")])
def test_bad_tau(tau):
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1\]"):
        pathway_expert_lists(np.full((1, 1, 2), 0.5), tau)


def test_bad_shapes_and_nan():
    with pytest.raises(ValueError, match=r"\[batch, layers, experts>0\]"):
        pathway_expert_lists(np.ones((2, 3)), 0.7)
    with pytest.raises(ValueError, match=r"\[layers, experts\]"):
        pathway_experts(np.ones((1, 2, 3)), 0.7)
    weights = np.full((3, 2, 2), 0.5)
    weights[1, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*samples \[1\]"):
        pathway_strings(weights)


# --- formats ------------------------------------------------------------------------------


def test_string_and_token_formats():
    experts = [[3, 1, 5], [9, 1], [12]]
    assert pathway_string(experts) == "3,1,5-9,1-12"
    assert pathway_token_tuple(experts) == (3, 1, 5, LAYER_BOUNDARY, 9, 1, LAYER_BOUNDARY, 12)
    assert LAYER_BOUNDARY == -1


def test_strings_and_tokens_from_weights():
    weights = np.zeros((2, 2, 12))
    weights[0, 0, [3, 1, 5]] = [0.5, 0.25, 0.25]  # cumulative 0.5, 0.75 (not > 0.75), 1.0
    weights[0, 1, [9, 1, 0]] = [0.5, 0.3, 0.2]
    weights[1, 0, 11] = 1.0
    weights[1, 1, [10, 2]] = [0.5, 0.5]
    assert pathway_strings(weights, tau=0.75) == ["3,1,5-9,1", "11-2,10"]
    assert pathway_tokens(weights, tau=0.75) == [(3, 1, 5, -1, 9, 1), (11, -1, 2, 10)]


@pytest.mark.parametrize("experts, layers, tau", [(8, 4, 0.7), (3, 2, 1.0), (64, 16, 0.5), (200, 2, 0.9)])
def test_layer_pathway_codes_give_the_per_sample_forms(experts, layers, tau):
    rng = np.random.default_rng(experts)
    weights = rng.dirichlet(np.full(experts, 0.3), size=(300, layers))
    weights[:20] = weights[0]  # repeated sample pathways
    weights[20:30] = 1.0 / experts  # ties: the lower id first
    expected = pathway_expert_lists(weights, tau)
    codes = layer_pathways(weights, tau)
    assert len(set(codes.patterns)) == len(codes.patterns)
    assert strings_of(codes) == pathway_strings(weights, tau) == [pathway_string(e) for e in expected]
    assert tokens_of(codes) == [pathway_token_tuple(e) for e in expected]
    for layer in range(layers):
        assert layer_strings_of(codes, layer) == [pathway_string([e[layer]]) for e in expected]
    np.testing.assert_array_equal(pathway_lengths(weights, tau), [[len(x) for x in e] for e in expected])
