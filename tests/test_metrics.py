"""Pathway distance (rapidfuzz) and pathway complexity / consistency."""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from moe_grok.analysis import metrics
from moe_grok.analysis.metrics import (
    cross_group_distance,
    group_pathway_distance,
    pairwise_pathway_distances,
    pathway_complexity,
    pathway_consistency,
    routing_embeddings,
)
from moe_grok.analysis.pathways import pathway_strings, pathway_tokens


def reference_levenshtein(a, b):
    """Textbook O(len(a) * len(b)) dynamic programme."""
    previous = list(range(len(b) + 1))
    for i, symbol_a in enumerate(a, 1):
        current = [i]
        for j, symbol_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (symbol_a != symbol_b)))
        previous = current
    return previous[-1]


def reference_complexity(mean_weights, router_matrices):
    """Plain-loop metric 2 (complexity) in float64."""
    result = []
    for sample in np.asarray(mean_weights, np.float64):
        embeddings = [sample[i] @ np.asarray(router_matrices[i], np.float64) for i in range(len(sample))]
        cosines = [
            embeddings[i] @ embeddings[i + 1] / (np.linalg.norm(embeddings[i]) * np.linalg.norm(embeddings[i + 1]))
            for i in range(len(sample) - 1)
        ]
        result.append(1 - sum(c / (max(cosines) + 1e-8) for c in cosines) / len(cosines))
    return np.array(result)


def random_pathways(rng, count, tau=0.7, layers=3, experts=12):
    """Realistic pathways of varied length: strings and token tuples from Dirichlet weights."""
    weights = rng.dirichlet(np.full(experts, 0.5), size=(count, layers))
    return pathway_strings(weights, tau), pathway_tokens(weights, tau)


# --- rapidfuzz distances ------------------------------------------------------------------


def test_hand_distances_char_vs_token():
    assert pairwise_pathway_distances(["3,1,5-9,1", "3,1,5-9,1"])[0, 1] == 0
    assert pairwise_pathway_distances(["3,1-9", "3,1-8"])[0, 1] == 1
    # "10" -> "1,0" is one insertion of ","; tokens (10,) -> (1, 0) need two edits
    assert pairwise_pathway_distances(["10", "1,0"], level="char")[0, 1] == 1
    assert pairwise_pathway_distances([(10,), (1, 0)], level="token")[0, 1] == 2
    assert pairwise_pathway_distances([(3, -1, 4), (3, 4)], level="token")[0, 1] == 1


def test_normalized_distances():
    matrix = pairwise_pathway_distances(["1,2", "1,3", "", ""], normalized=True)
    assert matrix.dtype == np.float64
    np.testing.assert_array_equal(matrix[0], [0.0, 1 / 3, 1.0, 1.0])
    assert matrix[2, 3] == 0.0


def test_pairs_argument_matches_matrix(rng):
    strings, tokens = random_pathways(rng, 9)
    pairs = np.array([[0, 1], [3, 3], [8, 2], [5, 0]])
    for pathways, level in ((strings, "char"), (tokens, "token")):
        matrix = pairwise_pathway_distances(pathways, level)
        got = pairwise_pathway_distances(pathways, level, pairs=pairs)
        np.testing.assert_array_equal(got, matrix[pairs[:, 0], pairs[:, 1]])
    assert pairwise_pathway_distances(strings, pairs=np.zeros((0, 2), int)).shape == (0,)


def test_rapidfuzz_agrees_with_textbook_dp(rng):
    strings, tokens = random_pathways(rng, 12)
    strings[3], tokens[3] = "", ()
    for pathways, level in ((strings, "char"), (tokens, "token")):
        matrix = pairwise_pathway_distances(pathways, level)
        normalized = pairwise_pathway_distances(pathways, level, normalized=True)
        for i, j in itertools.combinations(range(len(pathways)), 2):
            expected = reference_levenshtein(pathways[i], pathways[j])
            assert matrix[i, j] == matrix[j, i] == expected
            assert normalized[i, j] == pytest.approx(expected / max(len(pathways[i]), len(pathways[j]), 1))


def test_bad_level_and_types():
    with pytest.raises(ValueError, match="level must be 'char' or 'token'"):
        pairwise_pathway_distances(["1"], level="word")
    with pytest.raises(ValueError, match=r"level='char' needs str pathways.*item 1 is tuple"):
        pairwise_pathway_distances(["1", (1,)], level="char")
    with pytest.raises(ValueError, match=r"level='token'.*item 0 is str"):
        group_pathway_distance(["1", "2"], level="token")
    with pytest.raises(ValueError, match=r"pair indices must lie in \[0, 2\)"):
        pairwise_pathway_distances(["1", "2"], pairs=[[0, 2]])
    with pytest.raises(ValueError, match=r"pairs must be an index array \[m, 2\]"):
        pairwise_pathway_distances(["1", "2"], pairs=[0, 1, 1])


# --- group and cross-group means ----------------------------------------------------------


def test_group_mean_by_hand():
    # pairs: ("1,2","1,2") = 0, ("1,2","3") = 3 twice -> mean 2
    assert group_pathway_distance(["1,2", "1,2", "3"]) == 2.0
    assert group_pathway_distance(["4,5-6"] * 5) == 0.0
    assert group_pathway_distance([(1, 2), (1, 2), (3,)], level="token") == pytest.approx(4 / 3)
    assert group_pathway_distance(["1,2", "1,3", "1,2"], normalized=True) == pytest.approx(2 / 9)


def test_small_group():
    with pytest.raises(ValueError, match=r"needs >= 2 pathways, got 1"):
        group_pathway_distance(["1"])
    assert np.isnan(group_pathway_distance([], on_small="nan"))
    with pytest.raises(ValueError, match="on_small must be"):
        group_pathway_distance(["1"], on_small="zero")
    with pytest.raises(ValueError, match=r"max_pairs must be >= 1"):
        group_pathway_distance(["1", "2"], max_pairs=0)


def test_unordered_pair_indexing_is_exhaustive():
    for count in (2, 3, 7):
        all_pairs = metrics.unordered_pairs(count, np.arange(count * (count - 1) // 2))
        np.testing.assert_array_equal(all_pairs, np.stack(np.triu_indices(count, 1), axis=1))


def test_sampled_pairs_are_distinct_and_seeded():
    # lengths 1, 2, 4, 8, 16 -> every pair has a distinct distance (the length difference)
    pathways = ["1" * length for length in (1, 2, 4, 8, 16)]
    distances = [abs(len(a) - len(b)) for a, b in itertools.combinations(pathways, 2)]
    full = group_pathway_distance(pathways)
    assert full == np.mean(distances)
    assert group_pathway_distance(pathways, max_pairs=10) == full
    assert group_pathway_distance(pathways, max_pairs=1, seed=3) in distances
    # 9 of 10 distinct pairs: the mean must miss exactly one of the distances
    sampled = group_pathway_distance(pathways, max_pairs=9, seed=5)
    assert any(sampled == pytest.approx((sum(distances) - left_out) / 9) for left_out in distances)
    seeded = group_pathway_distance(pathways, max_pairs=4, seed=7)
    assert group_pathway_distance(pathways, max_pairs=4, seed=7) == seeded
    assert len({group_pathway_distance(pathways, max_pairs=4, seed=s) for s in range(10)}) > 1


def test_distances_do_not_depend_on_the_thread_policy(monkeypatch):
    """rapidfuzz in this thread (small calls) and on all cores (large ones) give the same numbers."""
    rng = np.random.default_rng(0)
    pathways = ["-".join(",".join(map(str, rng.permutation(8)[: rng.integers(1, 4)])) for _ in range(4))
                for _ in range(120)]
    tokens = [tuple(rng.integers(0, 8, rng.integers(1, 9))) for _ in range(120)]
    results = {}
    for threshold, workers in ((0, -1), (10**12, 1)):
        monkeypatch.setattr(metrics, "PARALLEL_MIN_DISTANCES", threshold)
        assert metrics._workers(10) == workers
        results[workers] = (
            group_pathway_distance(pathways), group_pathway_distance(pathways, normalized=True),
            group_pathway_distance(pathways, max_pairs=300, seed=1),
            group_pathway_distance(tokens, "token", max_pairs=50),
            cross_group_distance(pathways[:50], pathways[50:]), cross_group_distance(pathways[:50], pathways[50:],
                                                                                      max_pairs=400, seed=2),
            pairwise_pathway_distances(pathways).tobytes(),
            pairwise_pathway_distances(pathways, pairs=[[0, 5], [7, 3]]).tobytes())
    assert results[-1] == results[1]


def test_cross_group():
    assert cross_group_distance(["1", "2"], ["1"]) == 0.5
    assert cross_group_distance(["1,2", "3"], ["1,2", "3"]) == 1.5
    assert cross_group_distance([(1,)], [(1, -1, 2)], level="token", normalized=True) == pytest.approx(2 / 3)
    pathways = ["1" * length for length in (1, 2, 4)]
    assert cross_group_distance(pathways, ["1"], max_pairs=1, seed=0) in (0, 1, 3)
    with pytest.raises(ValueError, match=r"non-empty groups, got sizes 0 and 1"):
        cross_group_distance([], ["1"])
    assert np.isnan(cross_group_distance(["1"], [], on_small="nan"))


# --- pathway complexity and consistency ---------------------------------------------------


def test_complexity_by_hand():
    router = np.broadcast_to(np.eye(2, dtype=np.float32), (3, 2, 2))  # v_lk = unit vector k
    weights = np.array(
        [
            [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],  # cosines (1, 0) -> C = 1 - 1/2
            [[0.3, 0.7], [0.3, 0.7], [0.3, 0.7]],  # cosines (1, 1) -> C = 0
            [[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]],  # cosines (s, s), s = 1/sqrt 2 -> C = 0
        ],
        np.float32,
    )
    np.testing.assert_allclose(np.asarray(pathway_complexity(weights, router)), [0.5, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(pathway_consistency(weights, router)), [0.5, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(routing_embeddings(weights, router)), weights)


def test_complexity_negative_max_is_literal():
    router = np.stack([np.eye(2), -np.eye(2), np.eye(2)]).astype(np.float32)
    weights = np.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], np.float32)  # cosines (-1, 0)
    expected = 1 - (-1 / 1e-8 + 0) / 2
    np.testing.assert_allclose(np.asarray(pathway_complexity(weights, router)), [expected], rtol=1e-5)


def test_consistency_edge_cases_are_flagged():
    router = np.stack([np.eye(2), -np.eye(2), np.eye(2)]).astype(np.float32)
    weights = np.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],  # cosines (-1, 0): complexity ~5e7
                        [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],  # cosines (0, 0): max 0, flagged
                        [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]], np.float32)  # cosines (0, -1)
    flags = metrics.consistency_edge_cases(weights, router)
    assert flags["unbounded"].tolist() == [True, True, True] and flags["two_layers"] is False
    assert np.abs(np.asarray(pathway_complexity(weights[:1], router))[0]) > 1e6  # the formula itself is kept
    smooth = np.array([[[0.9, 0.1], [0.1, 0.9], [0.9, 0.1]]], np.float32)
    assert metrics.consistency_edge_cases(smooth, np.stack([np.eye(2), np.eye(2)[::-1], np.eye(2)]))[
        "unbounded"].tolist() == [False]
    two_layers = metrics.consistency_edge_cases(weights[:, :2], router[:2])
    assert two_layers["two_layers"] is True
    consistency = pathway_consistency(weights[1:2, :2] + 0.5, router[:2] + 1)
    np.testing.assert_allclose(np.asarray(consistency), [1.0], atol=1e-6)


def test_complexity_matches_plain_loop(rng, mesh8):
    weights = rng.dirichlet(np.ones(8), size=(5, 4)).astype(np.float32)
    router = rng.normal(size=(4, 8, 16)).astype(np.float32)
    expected = reference_complexity(weights, router)
    got = pathway_complexity(weights, router)
    assert got.shape == (5,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    sharded = pathway_complexity(weights, router, mesh=mesh8)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(got), rtol=1e-6)
    consistency = pathway_consistency(weights, router, mesh=mesh8)
    np.testing.assert_allclose(np.asarray(consistency), 1 - expected, rtol=1e-5, atol=1e-6)
    embeddings = routing_embeddings(weights, router, mesh=mesh8)
    expected_embeddings = np.einsum("ble,leh->blh", weights, router)
    np.testing.assert_allclose(np.asarray(embeddings), expected_embeddings, rtol=1e-5, atol=1e-6)


def test_complexity_bfloat16_inputs_in_float32(rng):
    weights = jnp.asarray(rng.dirichlet(np.ones(8), size=(3, 4)), jnp.bfloat16)
    router = jnp.asarray(rng.normal(size=(4, 8, 16)), jnp.bfloat16)
    got = pathway_complexity(weights, router)
    assert got.dtype == jnp.float32
    expected = reference_complexity(np.asarray(weights, np.float32), np.asarray(router, np.float32))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_complexity_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 layers, got 1"):
        pathway_complexity(np.ones((2, 1, 4)), np.ones((1, 4, 8)))
    with pytest.raises(ValueError, match=r"router_matrices \[layers, experts, hidden\]"):
        pathway_consistency(np.ones((2, 3, 4)), np.ones((3, 5, 8)))
    with pytest.raises(ValueError, match=r"mean_weights \[batch, layers, experts\]"):
        routing_embeddings(np.ones((3, 4)), np.ones((3, 4, 8)))
