"""Algorithmic datasets mod a prime (Power et al. 2022) for a decoder-only transformer.

Each example is the 4-token sequence ``[a, op, b, =]``; the model predicts the answer ``c``
at the last position (index ``ANSWER_POSITION``). Token layout for ``TaskSpec(p, ops)``:

    0 .. p-1               the numbers
    p + g                  the operator token of ``ops[g]`` (g = data-group index)
    p + len(ops)           "="

so ``vocab_size(p, ops) = p + len(ops) + 1``. A dataset with several operations is a
mixed-task dataset: every operation is one data group, split on its own (stratified), with
a split that depends only on ``(seed, op, that op's train fraction)`` - adding another operation
to ``ops`` leaves the split of the existing ones unchanged.

``random_labels`` replaces every training answer by a label drawn uniformly from 0..p-1 with
its own seeded stream (the split and the test answers are unchanged): a control task that can
be memorized but not generalized.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from moe_grok.data.splits import EvalSplit, position_targets

OPERATIONS = ("add", "sub", "mul", "div", "x2xyy2")
"""Known operations: a+b, a-b, a*b, a*b^-1 (b != 0), a^2+ab+b^2; all mod p."""

SEQ_LEN = 4
ANSWER_POSITION = SEQ_LEN - 1


def is_prime(n: int) -> bool:
    """Trial-division primality test (fine for the small moduli used here)."""
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n**0.5) + 1))


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Which operations, which modulus, and how to split.

    p: prime modulus. ops: operation names from ``OPERATIONS`` (order = group order = operator
    token order). train_fraction: per-group share of pairs in train, in (0, 1): one value for
    every operation, or one per operation (same order as ``ops``). random_labels: replace the
    training answers by seeded uniform random labels. seed: split (and random label) seed.
    """

    p: int = 97
    ops: tuple[str, ...] = ("add",)
    train_fraction: float | tuple[float, ...] = 0.5
    seed: int = 0
    random_labels: bool = False

    def __post_init__(self):
        ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
        object.__setattr__(self, "ops", ops)
        if not isinstance(self.train_fraction, (int, float, np.floating)):
            object.__setattr__(self, "train_fraction", tuple(float(f) for f in self.train_fraction))
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.p, (int, np.integer)) or not is_prime(self.p):
            raise ValueError(f"p must be prime, got {self.p}")
        if not ops:
            raise ValueError("ops must name at least one operation")
        unknown = [op for op in ops if op not in OPERATIONS]
        if unknown:
            raise ValueError(f"unknown operations {unknown}; known: {OPERATIONS}")
        if len(set(ops)) != len(ops):
            raise ValueError(f"ops must not repeat, got {ops}")
        fractions = self.train_fraction if isinstance(self.train_fraction, tuple) else (self.train_fraction,)
        if isinstance(self.train_fraction, tuple) and len(fractions) != len(ops):
            raise ValueError(f"train_fraction has {len(fractions)} values for {len(ops)} operations {ops}; "
                             "give one value, or one per operation")
        if not all(0.0 < f < 1.0 for f in fractions):
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        if not isinstance(self.random_labels, (bool, np.bool_)):
            raise ValueError(f"random_labels must be a bool, got {self.random_labels!r}")

    def split_sizes(self, op: str, validation_share: float = 0.5) -> dict[str, int]:
        """Pairs of operation ``op`` in each evaluation split ({"train", "validation", "test"}), as
        ``make_dataset`` and ``evaluation_splits`` cut them (without building them)."""
        n_pairs = self.p * (self.p - 1) if op == "div" else self.p * self.p
        n_train = min(max(round(self.fraction_of(op) * n_pairs), 1), n_pairs - 1)
        held_out = n_pairs - n_train
        validation = int(round(validation_share * held_out))
        return {"train": n_train, "validation": validation, "test": held_out - validation}

    def check_evaluation_splits(self, validation_share: float = 0.5) -> None:
        """ValueError naming every operation whose train, validation or test split (evaluation_splits)
        would be empty, and the options that size them (task.p, task.train_fraction)."""
        problems = []
        for op in self.ops:
            sizes = self.split_sizes(op, validation_share)
            empty = [name for name, size in sizes.items() if size < 1]
            if empty:
                problems.append(f"operation {op!r}: p={self.p} gives {sum(sizes.values())} pairs, train_fraction="
                                f"{self.fraction_of(op)} leaves {sizes} -> empty {' and '.join(empty)} split")
        if problems:
            raise ValueError("every evaluation split needs a pair of every operation: " + "; ".join(problems)
                             + ". Raise task.p or move task.train_fraction away from 0 / 1 (the held-out pairs "
                             "are halved into validation and test)")

    def fraction_of(self, op: str) -> float:
        """Train share of operation ``op``'s pairs."""
        if isinstance(self.train_fraction, tuple):
            return self.train_fraction[self.ops.index(op)]
        return float(self.train_fraction)

    @property
    def vocab_size(self) -> int:
        return self.p + len(self.ops) + 1

    @property
    def eq_token(self) -> int:
        return self.p + len(self.ops)

    def op_token(self, op: str) -> int:
        """Token id of operation ``op`` (must be one of ``self.ops``)."""
        if op not in self.ops:
            raise ValueError(f"operation {op!r} is not in this task's ops {self.ops}")
        return self.p + self.ops.index(op)


def vocab_size(p: int, ops) -> int:
    """Number of token ids: p numbers + one operator token per op + "=" (validates p and ops)."""
    return TaskSpec(p=p, ops=ops).vocab_size


def operand_pairs(op: str, p: int) -> tuple[np.ndarray, np.ndarray]:
    """All (a, b) operand pairs of ``op`` in row-major order: b ranges over 1..p-1 for "div".

    Returns a, b: [n_pairs] int64 (p*p pairs, or p*(p-1) for "div").
    """
    b_values = np.arange(1 if op == "div" else 0, p)
    a, b = np.meshgrid(np.arange(p), b_values, indexing="ij")
    return a.ravel(), b.ravel()


def apply_op(op: str, a: np.ndarray, b: np.ndarray, p: int) -> np.ndarray:
    """c = op(a, b) mod p, elementwise. a, b: [n] ints in 0..p-1 -> c: [n] int64."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if op == "add":
        return (a + b) % p
    if op == "sub":
        return (a - b) % p
    if op == "mul":
        return (a * b) % p
    if op == "div":
        if np.any(b % p == 0):
            raise ValueError("div is undefined for b = 0 mod p")
        inverse_b = np.array([pow(int(x), p - 2, p) for x in range(p)])  # Fermat; [0] unused
        return (a * inverse_b[b % p]) % p
    if op == "x2xyy2":
        return (a * a + a * b + b * b) % p
    raise ValueError(f"unknown operation {op!r}; known: {OPERATIONS}")


@dataclasses.dataclass(frozen=True, eq=False)
class AlgorithmicDataset:
    """A train/test split of one or more operations (read-only numpy arrays).

    *_inputs: [n, SEQ_LEN] int32 token ids ``[a, op, b, =]``; *_targets: [n] int32 answer c
    (a number token, 0..p-1; random in train with ``spec.random_labels``);
    *_groups: [n] int32 index into ``group_names`` (= ``spec.ops``).
    Within each split, examples are ordered by group, then by (a, b).
    """

    spec: TaskSpec
    train_inputs: np.ndarray
    train_targets: np.ndarray
    train_groups: np.ndarray
    test_inputs: np.ndarray
    test_targets: np.ndarray
    test_groups: np.ndarray
    group_names: tuple[str, ...]


def make_dataset(spec: TaskSpec) -> AlgorithmicDataset:
    """Every operand pair of every op, encoded and split per group by ``spec.train_fraction``.

    Per group: n_train = round(train_fraction * n_pairs), clipped to [1, n_pairs - 1]; the
    train pairs are a uniformly random subset drawn with ``default_rng([seed, op id])``. With
    ``random_labels``, the group's training answers come from ``default_rng([seed, op id, 2])``.
    """
    splits = {"train": ([], [], []), "test": ([], [], [])}
    for group, op in enumerate(spec.ops):
        a, b = operand_pairs(op, spec.p)
        inputs = np.stack(
            [a, np.full_like(a, spec.op_token(op)), b, np.full_like(a, spec.eq_token)], axis=1
        )
        targets = apply_op(op, a, b, spec.p)
        n_pairs = len(a)
        n_train = min(max(round(spec.fraction_of(op) * n_pairs), 1), n_pairs - 1)
        split_rng = np.random.default_rng([spec.seed, OPERATIONS.index(op)])
        permutation = split_rng.permutation(n_pairs)
        is_train = np.zeros(n_pairs, dtype=bool)
        is_train[permutation[:n_train]] = True
        train_targets = targets[is_train]
        if spec.random_labels:
            train_targets = np.random.default_rng([spec.seed, OPERATIONS.index(op), 2]).integers(0, spec.p, n_train)
        for name, mask, answers in (("train", is_train, train_targets), ("test", ~is_train, targets[~is_train])):
            splits[name][0].append(inputs[mask])
            splits[name][1].append(answers)
            splits[name][2].append(np.full(int(mask.sum()), group))

    def frozen_int32(parts):
        array = np.concatenate(parts).astype(np.int32)
        array.setflags(write=False)
        return array

    arrays = {
        f"{name}_{field}": frozen_int32(parts)
        for name, fields in splits.items()
        for field, parts in zip(("inputs", "targets", "groups"), fields, strict=True)
    }
    return AlgorithmicDataset(spec=spec, group_names=spec.ops, **arrays)


def answer_targets(inputs: np.ndarray, answers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Targets / target_mask [N, SEQ_LEN] scoring only the answer position."""
    return position_targets(inputs, answers, ANSWER_POSITION)


OPERAND_EMBEDDING_DIM = 4


def operand_embeddings(inputs: np.ndarray, p: int) -> np.ndarray:
    """[N, 4] float64 (cos, sin of 2 pi a / p, cos, sin of 2 pi b / p) of the sequences ``[a, op, b, =]``
    in inputs [N, SEQ_LEN]: a per-sample embedding of the operands for pairing Pretrain@t* with Test@t#
    groups. Two samples' cosine similarity is (cos(2 pi (a - a') / p) + cos(2 pi (b - b') / p)) / 2: near
    operands on the circle of residues mod p are similar, as they are for the modular operations."""
    inputs = np.asarray(inputs)
    if inputs.ndim != 2 or inputs.shape[1] != SEQ_LEN:
        raise ValueError(f"inputs must be [N, {SEQ_LEN}], got shape {inputs.shape}")
    angles = 2.0 * np.pi * inputs[:, [0, 2]].astype(np.float64) / p  # [N, 2]: a, b
    return np.stack([np.cos(angles[:, 0]), np.sin(angles[:, 0]), np.cos(angles[:, 1]), np.sin(angles[:, 1])], axis=1)


def evaluation_splits(data: AlgorithmicDataset, validation_share: float = 0.5) -> dict[str, EvalSplit]:
    """The splits every checkpoint is evaluated on (by training's evaluation and by the analysis),
    scored at the answer position, groups = operations: "train", and the held-out pairs cut in two
    by a seeded draw per operation: "validation" (Table 1's validation loss, and by default the
    held-out control of every metric) and "test" (accuracy, Test@ groups). Training logs "test"
    metrics over both halves."""
    data.spec.check_evaluation_splits(validation_share)

    def split_of(inputs, answers, groups):
        return EvalSplit(inputs, np.ones_like(inputs), *answer_targets(inputs, answers), groups, data.group_names)

    held_out = np.zeros(len(data.test_targets), bool)
    for group in range(len(data.group_names)):
        rows = np.flatnonzero(data.test_groups == group)
        rng = np.random.default_rng([data.spec.seed, group, 1])
        held_out[rng.choice(rows, int(round(validation_share * rows.size)), replace=False)] = True
    inputs, answers, groups = data.test_inputs, data.test_targets, data.test_groups
    return {"train": split_of(data.train_inputs, data.train_targets, data.train_groups),
            "test": split_of(inputs[~held_out], answers[~held_out], groups[~held_out]),
            "validation": split_of(inputs[held_out], answers[held_out], groups[held_out])}
