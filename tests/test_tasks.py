"""Algorithmic datasets: targets checked by brute force, split and vocab layout."""
import numpy as np
import pytest

from moe_grok.data import tasks

ALL_OPS = ("add", "sub", "mul", "div", "x2xyy2")


def brute_force_answer(op: str, a: int, b: int, p: int) -> int:
    """Independent reference: div searches for c with c*b = a (mod p)."""
    if op == "add":
        return (a + b) % p
    if op == "sub":
        return (a - b) % p
    if op == "mul":
        return (a * b) % p
    if op == "div":
        (c,) = [c for c in range(p) if (c * b) % p == a]
        return c
    if op == "x2xyy2":
        return (a**2 + a * b + b**2) % p
    raise AssertionError(op)


def all_rows(dataset):
    inputs = np.concatenate([dataset.train_inputs, dataset.test_inputs])
    targets = np.concatenate([dataset.train_targets, dataset.test_targets])
    groups = np.concatenate([dataset.train_groups, dataset.test_groups])
    return inputs, targets, groups


def test_targets_match_brute_force_for_every_op():
    spec = tasks.TaskSpec(p=11, ops=ALL_OPS, train_fraction=0.3, seed=1)
    inputs, targets, groups = all_rows(tasks.make_dataset(spec))
    for (a, op_token, b, eq_token), c, g in zip(inputs.tolist(), targets.tolist(),
                                                groups.tolist(), strict=True):
        op = ALL_OPS[g]
        assert op_token == 11 + g and eq_token == 11 + len(ALL_OPS)
        assert c == brute_force_answer(op, a, b, 11), (op, a, b)


def test_div_is_multiplication_by_modular_inverse():
    p = 97
    b = np.arange(1, p)
    c = tasks.apply_op("div", np.ones_like(b), b, p)
    assert np.all((c * b) % p == 1)
    assert tasks.apply_op("div", np.array([5]), np.array([3]), p)[0] == (5 * pow(3, -1, p)) % p
    with pytest.raises(ValueError, match="b = 0"):
        tasks.apply_op("div", np.array([1]), np.array([0]), p)


def test_every_pair_appears_exactly_once_and_splits_are_disjoint():
    p = 13
    dataset = tasks.make_dataset(tasks.TaskSpec(p=p, ops=("sub", "div"), train_fraction=0.4))
    for split in ("train", "test"):
        assert getattr(dataset, f"{split}_inputs").shape[1] == tasks.SEQ_LEN
    inputs, _, groups = all_rows(dataset)
    for g, op in enumerate(dataset.group_names):
        pairs = {(a, b) for a, _, b, _ in inputs[groups == g].tolist()}
        assert len(pairs) == (groups == g).sum()  # no duplicates across train + test
        b_range = range(1, p) if op == "div" else range(p)
        assert pairs == {(a, b) for a in range(p) for b in b_range}
    train_rows = {tuple(row) for row in dataset.train_inputs.tolist()}
    test_rows = {tuple(row) for row in dataset.test_inputs.tolist()}
    assert not train_rows & test_rows


def test_split_is_stratified_per_group():
    p, fraction = 13, 0.3
    dataset = tasks.make_dataset(tasks.TaskSpec(p=p, ops=("add", "div"), train_fraction=fraction))
    n_train = np.bincount(dataset.train_groups, minlength=2)
    n_test = np.bincount(dataset.test_groups, minlength=2)
    assert n_train.tolist() == [round(fraction * p * p), round(fraction * p * (p - 1))]
    assert (n_train + n_test).tolist() == [p * p, p * (p - 1)]
    assert dataset.group_names == ("add", "div")


def test_dtypes_shapes_and_read_only():
    dataset = tasks.make_dataset(tasks.TaskSpec(p=7, ops=("mul",)))
    for name in ("train_inputs", "train_targets", "train_groups",
                 "test_inputs", "test_targets", "test_groups"):
        array = getattr(dataset, name)
        assert array.dtype == np.int32, name
        assert not array.flags.writeable, name
    assert dataset.train_inputs.shape == (len(dataset.train_targets), 4)
    assert dataset.test_targets.max() < 7


def test_same_seed_same_split_and_different_seed_differs():
    spec = tasks.TaskSpec(p=17, ops=("add", "mul"), seed=3)
    first, second = tasks.make_dataset(spec), tasks.make_dataset(spec)
    np.testing.assert_array_equal(first.train_inputs, second.train_inputs)
    np.testing.assert_array_equal(first.test_targets, second.test_targets)
    other = tasks.make_dataset(tasks.TaskSpec(p=17, ops=("add", "mul"), seed=4))
    assert other.train_inputs.shape == first.train_inputs.shape
    assert not np.array_equal(other.train_inputs, first.train_inputs)


def test_adding_an_op_keeps_existing_groups_split():
    alone = tasks.make_dataset(tasks.TaskSpec(p=11, ops=("sub",), seed=2))
    mixed = tasks.make_dataset(tasks.TaskSpec(p=11, ops=("add", "sub"), seed=2))
    sub_train = mixed.train_inputs[mixed.train_groups == 1]
    # Same (a, b) pairs; only the operator token id moves (group 0 -> group 1).
    np.testing.assert_array_equal(sub_train[:, [0, 2]], alone.train_inputs[:, [0, 2]])


def test_vocab_layout():
    spec = tasks.TaskSpec(p=97, ops=("add", "div", "x2xyy2"))
    assert tasks.vocab_size(97, ("add", "div", "x2xyy2")) == spec.vocab_size == 97 + 3 + 1
    assert [spec.op_token(op) for op in spec.ops] == [97, 98, 99]
    assert spec.eq_token == 100 == spec.vocab_size - 1
    dataset = tasks.make_dataset(tasks.TaskSpec(p=5, ops=("add", "sub")))
    inputs, _, _ = all_rows(dataset)
    assert inputs.max() == dataset.spec.vocab_size - 1
    assert set(inputs[:, 1].tolist()) == {5, 6} and set(inputs[:, 3].tolist()) == {7}
    assert inputs[:, [0, 2]].max() < 5
    with pytest.raises(ValueError, match="not in this task"):
        spec.op_token("mul")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"p": 91}, "prime"),
        ({"p": 1}, "prime"),
        ({"ops": ("add", "pow")}, "unknown"),
        ({"ops": ()}, "at least one"),
        ({"ops": ("add", "add")}, "repeat"),
        ({"train_fraction": 0.0}, "train_fraction"),
        ({"train_fraction": 1.0}, "train_fraction"),
        ({"seed": -1}, "seed"),
    ],
)
def test_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tasks.TaskSpec(**kwargs)


def test_single_op_string_is_accepted():
    assert tasks.TaskSpec(ops="mul").ops == ("mul",)


def test_tiny_fraction_still_leaves_both_splits_non_empty():
    dataset = tasks.make_dataset(tasks.TaskSpec(p=2, ops=("div",), train_fraction=0.1))
    assert len(dataset.train_targets) == 1 and len(dataset.test_targets) == 1


def test_per_operation_train_fractions_keep_each_operations_split():
    """One fraction per op: each op is split as it would be alone with its own fraction."""
    mixed = tasks.make_dataset(tasks.TaskSpec(p=13, ops=("add", "div"), train_fraction=(0.3, 0.6), seed=4))
    n_train = np.bincount(mixed.train_groups, minlength=2)
    assert n_train.tolist() == [round(0.3 * 13 * 13), round(0.6 * 13 * 12)]
    for g, (op, fraction) in enumerate((("add", 0.3), ("div", 0.6))):
        alone = tasks.make_dataset(tasks.TaskSpec(p=13, ops=(op,), train_fraction=fraction, seed=4))
        np.testing.assert_array_equal(mixed.train_inputs[mixed.train_groups == g][:, [0, 2]],
                                      alone.train_inputs[:, [0, 2]])
    with pytest.raises(ValueError, match="2 values for 3 operations"):
        tasks.TaskSpec(p=13, ops=("add", "sub", "mul"), train_fraction=(0.3, 0.6))
    with pytest.raises(ValueError, match="train_fraction"):
        tasks.TaskSpec(p=13, ops=("add", "sub"), train_fraction=(0.3, 1.0))


def test_random_labels_replace_train_answers_only():
    import dataclasses

    spec = tasks.TaskSpec(p=31, ops=("add", "mul"), train_fraction=0.5, seed=2)
    true, noisy = tasks.make_dataset(spec), tasks.make_dataset(dataclasses.replace(spec, random_labels=True))
    np.testing.assert_array_equal(noisy.train_inputs, true.train_inputs)  # same split
    np.testing.assert_array_equal(noisy.test_targets, true.test_targets)  # test answers untouched
    agree = np.mean(noisy.train_targets == true.train_targets)
    assert agree < 0.1 and noisy.train_targets.max() < 31  # random: right about 1/p of the time
    again = tasks.make_dataset(dataclasses.replace(spec, random_labels=True))
    np.testing.assert_array_equal(again.train_targets, noisy.train_targets)  # seeded
    other = tasks.make_dataset(dataclasses.replace(spec, random_labels=True, seed=3))
    assert np.mean(other.train_targets[:50] == noisy.train_targets[:50]) < 0.5
