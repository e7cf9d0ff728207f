"""What the monitor needs to know of a probe set: how many samples it has and their data domains.

The analysis reads of a split only its domains (`group_names`, `rows(domain)`) and its size, so a
probe set of someone else's data needs no tokens: `ProbeSet` is that description, and
`analysis.analyze` takes it where it takes an `EvalSplit`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_DOMAIN = "all"  # the one domain of a probe set given without domain labels


@dataclasses.dataclass(frozen=True, eq=False)
class ProbeSet:
    """N samples in domains. groups: [N] int, an index into group_names (every domain non-empty)."""

    groups: np.ndarray
    group_names: tuple[str, ...]

    def __post_init__(self):
        groups = np.asarray(self.groups)
        if groups.ndim != 1 or groups.size == 0 or groups.dtype.kind not in "iu":
            raise ValueError(f"a probe set needs [N >= 1] integer domain ids, got {groups.dtype} {groups.shape}")
        counts = np.bincount(groups, minlength=len(self.group_names)) if groups.min() >= 0 else None
        if counts is None or len(counts) > len(self.group_names):
            raise ValueError(f"domain ids must lie in [0, {len(self.group_names)}), got {groups.min()}..{groups.max()}")
        empty = [self.group_names[g] for g in np.flatnonzero(counts == 0)]
        if empty:
            raise ValueError(f"empty domain(s) {empty}: every domain needs at least one sample")
        object.__setattr__(self, "groups", groups.astype(np.int32))
        object.__setattr__(self, "group_names", tuple(str(g) for g in self.group_names))

    @classmethod
    def of_size(cls, n: int) -> ProbeSet:
        """n samples of one domain (DEFAULT_DOMAIN)."""
        return cls(np.zeros(int(n), np.int32), (DEFAULT_DOMAIN,))

    @classmethod
    def from_labels(cls, labels: Sequence[str]) -> ProbeSet:
        """One domain label per sample; domains in order of first appearance."""
        labels = [str(label) for label in labels]
        names = tuple(dict.fromkeys(labels))
        index = {name: i for i, name in enumerate(names)}
        return cls(np.array([index[label] for label in labels], np.int32), names)

    @classmethod
    def from_split(cls, split: Any) -> ProbeSet:
        """The probe description of an EvalSplit (or of anything with `groups` and `group_names`)."""
        return cls(np.asarray(split.groups), tuple(split.group_names))

    def __len__(self) -> int:
        return len(self.groups)

    def rows(self, group: str) -> np.ndarray:
        """Indices of the samples of domain `group` (ValueError naming the known domains otherwise)."""
        if group not in self.group_names:
            raise ValueError(f"no domain {group!r}; domains are {list(self.group_names)}")
        return np.flatnonzero(self.groups == self.group_names.index(group))

    def to_json(self) -> dict[str, Any]:
        return {"group_names": list(self.group_names), "groups": self.groups.tolist()}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ProbeSet:
        return cls(np.asarray(value["groups"], np.int32), tuple(value["group_names"]))


def probe_set(spec: Any) -> ProbeSet:
    """A ProbeSet from what a caller gives per probe: a ProbeSet, an EvalSplit (or anything with
    `groups` and `group_names`), a sample count (one domain), or a sequence of per-sample domain labels."""
    if isinstance(spec, ProbeSet):
        return spec
    if hasattr(spec, "groups") and hasattr(spec, "group_names"):
        return ProbeSet.from_split(spec)
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        return ProbeSet.of_size(int(spec))
    if isinstance(spec, (Sequence, np.ndarray)) and not isinstance(spec, (str, bytes)):
        return ProbeSet.from_labels(list(spec))
    raise TypeError(f"a probe set is a ProbeSet, an EvalSplit, a sample count or per-sample domain labels; "
                    f"got {type(spec).__name__}")
