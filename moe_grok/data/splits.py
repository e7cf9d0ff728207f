"""EvalSplit: the samples every checkpoint is evaluated on (numpy only; no JAX below this layer).

Arrays, for N samples of S tokens:
  tokens      [N, S] int32  token ids, right-padded
  mask        [N, S] int32  1 = real token, 0 = padding
  targets     [N, S] int32  the token scored at each position (next token for language modelling)
  target_mask [N, S] int32  1 where position t is scored (loss / exact match); every sample needs one
  groups      [N]    int32  index into group_names (one group = one data domain)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np


def next_token_targets(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Language-model targets: predict token t+1 at position t. Returns (targets, target_mask) [N, S] int32."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
    target_mask = np.concatenate([mask[:, 1:] * mask[:, :-1], np.zeros_like(mask[:, :1])], axis=1)
    return targets.astype(np.int32), target_mask.astype(np.int32)


def position_targets(inputs: np.ndarray, answers: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]:
    """Targets / target_mask [N, S] scoring only `position` (e.g. the answer of an algorithmic task)."""
    targets = np.zeros_like(inputs, dtype=np.int32)
    targets[:, position] = answers
    target_mask = np.zeros_like(inputs, dtype=np.int32)
    target_mask[:, position] = 1
    return targets, target_mask


@dataclasses.dataclass(frozen=True, eq=False)
class EvalSplit:
    """Samples to run through every checkpoint (see the module docstring for the arrays)."""

    tokens: np.ndarray
    mask: np.ndarray
    targets: np.ndarray
    target_mask: np.ndarray
    groups: np.ndarray
    group_names: tuple[str, ...]

    def __post_init__(self):
        n = len(self.tokens)
        if n == 0:
            raise ValueError("an evaluation split has no samples")
        for name in ("mask", "targets", "target_mask"):
            if getattr(self, name).shape != self.tokens.shape:
                raise ValueError(f"{name} shape {getattr(self, name).shape} != tokens shape {self.tokens.shape}")
        if self.groups.shape != (n,):
            raise ValueError(f"groups shape {self.groups.shape} != ({n},)")
        counts = np.bincount(self.groups, minlength=len(self.group_names))
        if len(counts) > len(self.group_names):
            raise ValueError(f"group ids up to {len(counts) - 1} but only {len(self.group_names)} group names")
        empty = [self.group_names[g] for g in np.flatnonzero(counts == 0)]
        if empty:
            raise ValueError(f"empty group(s) {empty}: every group needs at least one sample")
        # A sample with no scored position (e.g. one real token under next-token targets) has no loss:
        # it would read as loss 0 at every checkpoint, be "memorized" at the first and form a
        # spurious Pretrain@ group.
        unscored = np.flatnonzero(np.asarray(self.target_mask).sum(axis=1) == 0)
        if unscored.size:
            groups = sorted({self.group_names[g] for g in self.groups[unscored]})
            raise ValueError(f"sample(s) {unscored[:10].tolist()} ({unscored.size} in all, group(s) {groups}) have "
                             "no scored position (target_mask all 0; a next-token sample needs >= 2 real tokens): "
                             "drop them, as the corpus loaders do")

    def __len__(self) -> int:
        return len(self.tokens)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, mask, targets, target_mask), as extraction.routing's extract_* functions take them."""
        return self.tokens, self.mask, self.targets, self.target_mask

    def answers(self) -> np.ndarray:
        """[N] int64 every sample's answer: its target token at its one scored position (the toy tasks'
        answer). ValueError if a sample has more than one scored position (next-token text has no answer)."""
        scored = np.asarray(self.target_mask) != 0
        several = np.flatnonzero(scored.sum(axis=1) != 1)
        if several.size:
            raise ValueError(f"sample(s) {several[:10].tolist()} ({several.size} in all) have more than one scored "
                             "position: an answer is the target of a sample's one scored position")
        return np.asarray(self.targets)[scored].astype(np.int64)

    def rows(self, group: str) -> np.ndarray:
        """Indices of the samples of `group` (ValueError naming the known groups otherwise)."""
        if group not in self.group_names:
            raise ValueError(f"no group {group!r}; groups are {list(self.group_names)}")
        return np.flatnonzero(self.groups == self.group_names.index(group))

    def subset(self, rows: np.ndarray) -> EvalSplit:
        """The samples `rows` (group names kept; groups left empty are dropped)."""
        rows = np.asarray(rows)
        kept = np.unique(self.groups[rows])
        remap = np.full(len(self.group_names), -1, np.int32)
        remap[kept] = np.arange(len(kept))
        return EvalSplit(self.tokens[rows], self.mask[rows], self.targets[rows], self.target_mask[rows],
                         remap[self.groups[rows]], tuple(self.group_names[g] for g in kept))

    def fingerprint(self) -> str:
        """sha1 of every array and the group names: two splits with the same fingerprint are the same data."""
        digest = hashlib.sha1()
        for array in (self.tokens, self.mask, self.targets, self.target_mask, self.groups):
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(json.dumps(self.group_names).encode())
        return digest.hexdigest()
