"""A tiny offline corpus for the examples: windows of bytes of this repository's own docs.

Each document is one data domain; its text is cut into non-overlapping windows of `seq_len`
bytes, tokenized as the bytes themselves (vocabulary 256, no padding). Some windows of each
domain are the training set, others are held out (never trained on): the monitor watches the
training windows and compares them with the held-out ones.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

VOCAB_SIZE = 256  # one token per byte value
DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")
DOMAINS = {"method": "method.md", "training": "training.md"}  # domain name -> document under docs/


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token windows [N, seq_len] int64 with per-sample domain labels, for training and held out."""

    train: np.ndarray
    train_domains: list[str]
    held_out: np.ndarray
    held_out_domains: list[str]


def load_corpus(seq_len: int = 32, train_per_domain: int = 16, held_out_per_domain: int = 8,
                seed: int = 0, docs_dir: str = DOCS) -> Corpus:
    """Random windows of each domain's document: `train_per_domain` to train on, `held_out_per_domain` held out."""
    rng = np.random.default_rng(seed)
    train, train_domains, held_out, held_out_domains = [], [], [], []
    for domain, name in DOMAINS.items():
        with open(os.path.join(docs_dir, name), "rb") as f:
            data = np.frombuffer(f.read(), np.uint8).astype(np.int64)
        windows = data[:len(data) // seq_len * seq_len].reshape(-1, seq_len)
        need = train_per_domain + held_out_per_domain
        if len(windows) < need:
            raise ValueError(f"{name} has {len(windows)} windows of {seq_len} bytes; {need} are needed")
        picked = windows[rng.permutation(len(windows))[:need]]
        train.append(picked[:train_per_domain])
        held_out.append(picked[train_per_domain:])
        train_domains += [domain] * train_per_domain
        held_out_domains += [domain] * held_out_per_domain
    return Corpus(np.concatenate(train), train_domains, np.concatenate(held_out), held_out_domains)
