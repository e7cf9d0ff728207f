"""Pretrain@t* / Test@t# grouping and the Hungarian pairing of groups."""
import itertools

import numpy as np
import pytest

from moe_grok.analysis import groups
from moe_grok.analysis.grokking import NEVER


def test_groups_by_step_drops_never_and_the_final_step():
    t_star = np.array([20, NEVER, 10, 20, 30, 10, 30])
    rows = np.arange(7) + 100
    found = groups.groups_by_step(t_star, rows, last_step=30, name_of=groups.pretrain_group_name)
    assert [(g.name, g.step, g.rows.tolist()) for g in found] == [
        ("Pretrain@10", 10, [102, 105]), ("Pretrain@20", 20, [100, 103])]
    tests = groups.groups_by_step(t_star, rows, last_step=None, name_of=groups.test_group_name)
    assert [g.name for g in tests] == ["Test@10", "Test@20", "Test@30"]


def _brute_force_best_total(similarity):
    n_p, n_q = similarity.shape
    if n_p <= n_q:
        return max(sum(similarity[i, j] for i, j in zip(range(n_p), perm, strict=False))
                   for perm in itertools.permutations(range(n_q), n_p))
    return _brute_force_best_total(similarity.T)


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (5, 3)])
def test_pairing_maximizes_total_similarity_like_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        similarity = rng.uniform(-1, 1, shape)
        pairs = groups.pair_groups(similarity)
        assert len(pairs) == min(shape)
        assert len({i for i, _ in pairs}) == len({j for _, j in pairs}) == len(pairs)  # one-to-one
        assert sum(similarity[i, j] for i, j in pairs) == pytest.approx(_brute_force_best_total(similarity))


def test_pairing_ties_go_to_chronological_order():
    assert groups.pair_groups(np.ones((3, 3))) == [(0, 0), (1, 1), (2, 2)]
    assert groups.pair_groups(np.ones((2, 4))) == [(0, 0), (1, 3)]
    assert groups.pair_groups(np.ones((0, 3))) == []
    with pytest.raises(ValueError, match="non-finite"):
        groups.pair_groups(np.array([[1.0, np.nan]]))


def test_similarity_from_embeddings_and_without():
    train = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    test = np.array([[0.0, 2.0], [3.0, 0.0]])
    pretrain = [groups.SampleGroup("Pretrain@10", 10, np.array([0, 1])), groups.SampleGroup("Pretrain@20", 20,
                                                                                             np.array([2]))]
    tests = [groups.SampleGroup("Test@30", 30, np.array([0])), groups.SampleGroup("Test@40", 40, np.array([1]))]
    similarity = groups.similarity_matrix(pretrain, tests, train, test)
    assert similarity[1, 0] == pytest.approx(1.0) and similarity[1, 1] == pytest.approx(0.0)
    assert similarity[0, 1] == pytest.approx((1.0 + 1.0 / np.sqrt(1.01)) / 2)
    assert groups.pair_groups(similarity) == [(0, 1), (1, 0)]  # content beats chronology
    np.testing.assert_array_equal(groups.similarity_matrix(pretrain, tests, None, None), np.ones((2, 2)))


def test_embeddings_must_match_the_samples():
    with pytest.raises(ValueError, match=r"shape \(3, 2\), need \[4, dim\]"):
        groups.check_embeddings("split 'train'", np.zeros((3, 2)), 4)
    with pytest.raises(ValueError, match="finite"):
        groups.check_embeddings("split 'train'", np.full((2, 2), np.nan), 2)


def test_no_pretrain_groups_pair_nothing_with_embeddings():
    """A run with no sample memorized before the end (no Pretrain@t* group) pairs nothing, with
    embeddings as without (round 4's cosine arm: the similarity had shape (0,) and pairing raised)."""
    test = [groups.SampleGroup("Test@100", 100, np.array([0, 1]))]
    embeddings = np.eye(3)
    for train_embeddings, test_embeddings in ((embeddings, embeddings), (None, None)):
        similarity = groups.similarity_matrix([], test, train_embeddings, test_embeddings)
        assert similarity.shape == (0, 1)
        assert groups.pair_groups(similarity) == []
    assert groups.similarity_matrix(test, [], embeddings, embeddings).shape == (1, 0)
