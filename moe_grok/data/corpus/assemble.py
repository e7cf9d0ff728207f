"""Samples of every domain -> one padded `EvalSplit` (and `LoadInfo`): the core every loader shares.

Validation of the loader arguments and of token ids, truncation to seq_len, dropping of samples
with < 2 tokens, right-padding and next-token targets (the rules of the package docstring).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from moe_grok.data.corpus.domains import choose_samples
from moe_grok.data.splits import EvalSplit, next_token_targets

OLMOE_PAD_ID = 1  # allenai/OLMoE-1B-7B-0924 pad_token_id ("<|padding|>")
OLMOE_EOS_TOKEN = "<|endoftext|>"  # its eos token (id 50279)
ID_LIMIT = 2**31  # token ids are stored as int32
_SHORT_POLICIES = ("drop", "error")


@dataclasses.dataclass(frozen=True)
class LoadInfo:
    """What a loader did. sample_ids / lengths / available are per row / per group."""

    sample_ids: tuple[str, ...]  # [N] provenance of each row, e.g. "a.jsonl:line 3"
    lengths: np.ndarray  # [N] int32 real tokens per row (after truncation)
    n_truncated: int  # rows that were longer than seq_len and cut
    n_dropped_short: int  # samples dropped for having < 2 tokens
    available: dict[str, int]  # group -> candidate samples before max_samples_per_group
    n_duplicates: int = 0  # rows equal (after truncation) to an earlier row of their group: kept, counted


# A materialized sample: (provenance label, ids [<= seq_len or full], original length).
Sample = tuple[str, np.ndarray, int]


def check_loader_args(seq_len: int, pad_id: int, vocab_size: int | None, max_samples_per_group: int | None,
                      on_short: str) -> None:
    """ValueError for an argument every loader shares that is out of range."""
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (one next-token target needs 2 tokens), got {seq_len!r}")
    if vocab_size is not None and (not isinstance(vocab_size, (int, np.integer)) or not 0 < vocab_size <= ID_LIMIT):
        raise ValueError(f"vocab_size must be a positive integer <= 2**31, got {vocab_size!r}")
    limit = ID_LIMIT if vocab_size is None else vocab_size
    if not isinstance(pad_id, (int, np.integer)) or not 0 <= pad_id < limit:
        raise ValueError(f"pad_id {pad_id!r} must be an integer in [0, {limit})")
    if max_samples_per_group is not None and (not isinstance(max_samples_per_group, (int, np.integer))
                                              or max_samples_per_group < 1):
        raise ValueError(f"max_samples_per_group must be a positive integer or None, got {max_samples_per_group!r}")
    if on_short not in _SHORT_POLICIES:
        raise ValueError(f"on_short must be one of {_SHORT_POLICIES}, got {on_short!r}")


def as_token_ids(value: Any, label: str) -> np.ndarray:
    """A 1-D integer id array from a list / array, or ValueError naming the sample."""
    if isinstance(value, (str, bytes, Mapping)):
        raise ValueError(f"{label}: expected a list of integer token ids, got {type(value).__name__}")
    if isinstance(value, (list, tuple)) and any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                                                for v in value):
        bad = next(v for v in value if isinstance(v, bool) or not isinstance(v, (int, np.integer)))
        raise ValueError(f"{label}: token ids must be integers, found {bad!r}")
    try:
        ids = np.asarray(value)
    except (OverflowError, ValueError) as e:
        raise ValueError(f"{label}: cannot read token ids ({e})") from None
    if ids.size == 0:
        return np.zeros((0,), np.int64)
    if ids.ndim != 1:
        raise ValueError(f"{label}: token ids must be a flat list, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"{label}: token ids must be integers, got dtype {ids.dtype}")
    return ids


def _check_token_range(ids: np.ndarray, label: str, vocab_size: int | None) -> None:
    if ids.size == 0:
        return
    limit = ID_LIMIT if vocab_size is None else vocab_size
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= limit:
        bad = lo if lo < 0 else hi
        what = f"vocab_size {vocab_size}" if vocab_size is not None else "the int32 range"
        raise ValueError(f"{label}: token id {bad} outside [0, {limit}) ({what})")


def assemble_split(groups: Sequence[tuple[str, Sequence[Sample]]], seq_len: int, pad_id: int,
                   vocab_size: int | None, on_short: str, available: dict[str, int], return_info: bool):
    """[(domain, its samples), ...] -> EvalSplit [N, seq_len] (and LoadInfo): truncate, validate, pad."""
    if not groups:
        raise ValueError("no groups to load")
    rows, labels, group_ids, lengths = [], [], [], []
    n_truncated = n_short = 0
    short_examples: list[str] = []
    duplicate_examples: list[str] = []
    for g, (name, samples) in enumerate(groups):
        kept = 0
        first_of: dict[bytes, str] = {}  # a row's ids -> the label of its first occurrence in this group
        for label, ids, full_length in samples:
            if full_length > seq_len:
                n_truncated += 1
            ids = ids[:seq_len]
            _check_token_range(ids, label, vocab_size)
            if len(ids) < 2:
                if on_short == "error":
                    raise ValueError(f"{label}: sample has {len(ids)} token(s); next-token prediction needs >= 2 "
                                     f"(on_short='drop' drops such samples)")
                n_short += 1
                if len(short_examples) < 3:
                    short_examples.append(label)
                continue
            key = np.asarray(ids, np.int64).tobytes()
            if key in first_of:
                # Kept (the data is the user's), but a duplicate pairs with its copy at distance 0: say so.
                duplicate_examples.append(f"{label} = {first_of[key]}")
            else:
                first_of[key] = label
            rows.append(ids)
            labels.append(label)
            group_ids.append(g)
            lengths.append(len(ids))
            kept += 1
        if kept == 0:
            raise ValueError(f"group {name!r} has no sample with >= 2 tokens ({len(samples)} candidate(s) read); "
                             "every group needs at least one sample")
    if n_truncated:
        logging.warning("truncated %d of %d sample(s) to seq_len=%d tokens", n_truncated, len(rows) + n_short, seq_len)
    if n_short:
        logging.warning("dropped %d sample(s) with < 2 tokens (no next-token target), e.g. %s",
                       n_short, ", ".join(short_examples))
    if duplicate_examples:
        logging.warning("%d sample(s) repeat an earlier sample of their domain (kept; a repeat pairs with its copy "
                        "at distance 0), e.g. %s", len(duplicate_examples), ", ".join(duplicate_examples[:3]))
    n = len(rows)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    for i, ids in enumerate(rows):
        tokens[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
    targets, target_mask = next_token_targets(tokens, mask)
    split = EvalSplit(tokens, mask, targets, target_mask, np.asarray(group_ids, np.int32),
                      tuple(name for name, _ in groups))
    if not return_info:
        return split
    return split, LoadInfo(tuple(labels), np.asarray(lengths, np.int32), n_truncated, n_short, dict(available),
                         len(duplicate_examples))


def make_lm_split(samples_by_group: Mapping[str, Sequence[Sequence[int]]], seq_len: int, *, pad_id: int = OLMOE_PAD_ID,
                  vocab_size: int | None = None, max_samples_per_group: int | None = None, seed: int = 0,
                  on_short: str = "drop", return_info: bool = False):
    """In-memory id lists per group -> EvalSplit (groups in mapping order, samples in list order).

    samples_by_group: group name -> list of 1-D integer id sequences (any lengths).
    Returns EvalSplit with arrays [N, seq_len] (or (EvalSplit, LoadInfo) with return_info).
    """
    check_loader_args(seq_len, pad_id, vocab_size, max_samples_per_group, on_short)
    if not samples_by_group:
        raise ValueError("samples_by_group is empty: no groups to load")
    groups, available = [], {}
    for name, seqs in samples_by_group.items():
        if len(seqs) == 0:
            raise ValueError(f"group {name!r} has no samples")
        available[str(name)] = len(seqs)
        chosen = choose_samples(len(seqs), max_samples_per_group, seed, str(name))
        samples = []
        for i in chosen:
            label = f"{name}[{i}]"
            ids = as_token_ids(seqs[i], label)
            samples.append((label, ids, len(ids)))
        groups.append((str(name), samples))
    return assemble_split(groups, seq_len, pad_id, vocab_size, on_short, available, return_info)

