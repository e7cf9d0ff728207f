"""The metric registry: every per-set metric curve of the report, how it is computed and how it is shown.

A metric is measured on a set of samples (the memorized samples of a domain, its controls, a
Pretrain@t* group...) at every checkpoint, giving one curve [checkpoints]. The report builder
(`analysis.analyze`), the report files (Table 1 rows, CSV rows), the plots and the toy protocol's
quantities all read this registry, so a new metric, e.g. another distance variant, is ONE
`register` call (docs/architecture.md, "Where to add a metric").

Order matters: curves appear in the report, the CSVs and the plots in registration order.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

# Where a metric can be computed: the memorized set and its held-out / random-training controls
# ("sets"), each Pretrain@t* group ("pretrain_groups") and that group's own controls
# ("group_controls"), all domains' memorized samples pooled ("global"), and the memorized set of
# each (eps, delta) of the sweep ("sweeps").
SCOPES = ("sets", "pretrain_groups", "group_controls", "global", "sweeps")
VARIANT_SCOPES = ("sets", "pretrain_groups")  # distance variants: beside the primary distance, not on every control
ROLES = ("primary", "variant", "control", "derived", "diagnostic", "exploratory")
REQUIREMENTS = ("answers",)  # inputs a metric may need beyond pathways (SetMetrics.has): the samples' answer labels
FAMILIES = ("distance", "consistency", "")  # partial correlations list the distance family first

# (set engine, split name, sample rows [n] int, checkpoint index) -> the metric's value of that set there
Compute = Callable[[Any, str, np.ndarray, int], float]


@dataclasses.dataclass(frozen=True)
class Metric:
    """One per-set metric.

    name: its curve's key in the report and the CSVs. compute: (engine, split, rows, checkpoint)
    -> float, NaN where undefined (the engine is `analysis.set_metrics.SetMetrics`: cached
    pathways, distances and consistencies). role: "primary" (the paper's metrics; Table 1 rows on
    the memorized set and on every control set), "variant" (another form of a primary metric),
    "control" (a confound; Table 1 row on the memorized set), "derived" or "diagnostic" (in the
    curves only), "exploratory" (a candidate of our own, registered as such: Table 1 rows on the
    memorized set and on every control set, as a primary metric). family: "distance" /
    "consistency" / "" (groups variants with their metric).
    label: short noun for table and protocol labels ("distance"). table_label: the memorized
    set's Table 1 row (None: no row). title: plot panel title. axis_label: the y axis, with its
    unit. plot: the figure with a panel for it ("analysis", "distances" or None). computed_on:
    the SCOPES it is measured in. partial: Table 1 also gives its partial correlation with test
    accuracy controlling for routing entropy and pathway length. paper_sign: the sign of its
    correlation with test accuracy the paper reports (-1, +1; None: not a protocol hypothesis).
    orientation: for a metric the paper's text leaves open which way round it is read, this
    reading ("1 - C", "C": pathway consistency as 1 - C or as the formula's C itself); the protocol
    tests each reading with the paper's sign. For an exploratory metric, paper_sign is the sign
    registered for it before any run (docs/protocol.md). requires: an input the metric needs
    beyond pathways (REQUIREMENTS; None: none): an engine without it leaves the metric out of every
    curve, so the report is the one without the metric.
    """

    name: str
    compute: Compute
    role: str
    label: str
    title: str
    axis_label: str
    family: str = ""
    table_label: str | None = None
    plot: str | None = None
    computed_on: tuple[str, ...] = SCOPES
    partial: bool = False
    paper_sign: float | None = None
    level: str | None = None  # distance variants: "char" or "token" edit distance ...
    normalized: bool | None = None  # ... divided by the longer pathway's length
    orientation: str | None = None
    requires: str | None = None

    def __post_init__(self):
        problems = []
        if self.role not in ROLES:
            problems.append(f"role must be one of {ROLES}, got {self.role!r}")
        if self.family not in FAMILIES:
            problems.append(f"family must be one of {FAMILIES}, got {self.family!r}")
        if not self.computed_on or any(s not in SCOPES for s in self.computed_on):
            problems.append(f"computed_on must name some of {SCOPES}, got {self.computed_on}")
        if self.requires not in (None, *REQUIREMENTS):
            problems.append(f"requires must be None or one of {REQUIREMENTS}, got {self.requires!r}")
        if self.plot not in (None, "analysis", "distances"):
            problems.append(f"plot must be None, 'analysis' or 'distances', got {self.plot!r}")
        if problems:
            raise ValueError(f"metric {self.name!r}: " + "; ".join(problems))


_REGISTRY: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add a metric (after every registered one); ValueError if its name is taken."""
    if metric.name in _REGISTRY:
        raise ValueError(f"a metric named {metric.name!r} is already registered")
    _REGISTRY[metric.name] = metric
    return metric


def unregister(name: str) -> Metric:
    """Remove a registered metric; KeyError if there is none of that name."""
    return _REGISTRY.pop(name)


@contextlib.contextmanager
def registered(metric: Metric) -> Iterator[Metric]:
    """The registry with `metric` added for the duration of the block (tests, one-off studies)."""
    register(metric)
    try:
        yield metric
    finally:
        unregister(metric.name)


def metrics(scope: str | None = None, role: str | None = None, plot: str | None = None) -> list[Metric]:
    """Registered metrics in registration order, those measured in `scope` / of `role` / shown in `plot`."""
    return [m for m in _REGISTRY.values() if (scope is None or scope in m.computed_on)
            and (role is None or m.role == role) and (plot is None or m.plot == plot)]


def get(name: str) -> Metric:
    """The registered metric `name`; KeyError naming the registered ones if there is none."""
    if name not in _REGISTRY:
        raise KeyError(f"no metric {name!r}; registered: {list(_REGISTRY)}")
    return _REGISTRY[name]


def names(scope: str | None = None, role: str | None = None) -> tuple[str, ...]:
    return tuple(m.name for m in metrics(scope, role))


def partial_metrics() -> list[Metric]:
    """Metrics with a partial correlation, the distance family first (primary, then its variants)."""
    return sorted((m for m in _REGISTRY.values() if m.partial), key=lambda m: FAMILIES.index(m.family))


def protocol_metrics() -> list[Metric]:
    """Metrics whose correlation sign the toy protocol tests against the paper's (paper_sign set)."""
    return [m for m in _REGISTRY.values() if m.paper_sign is not None]


def distance_axis_label(level: str, normalized: bool) -> str:
    """The y-axis label (with unit) of the distance variant of this form, for the primary distance's axes."""
    for m in metrics(role="variant"):
        if m.level == level and m.normalized == normalized:
            return m.axis_label
    return get("distance").axis_label


# ------------------------------------------------------------------------------------------------
# The metrics of the paper and their controls (docs/method.md)
# ------------------------------------------------------------------------------------------------
def _primary_distance(engine, split: str, rows: np.ndarray, checkpoint: int) -> float:
    options = engine.options
    return engine.distance(split, rows, checkpoint, options.distance_level, options.distance_normalized)


def distance_form(level: str, normalized: bool) -> Compute:
    """compute of the mean pairwise pathway edit distance of one form ("char" / "token", normalized or not)."""
    def compute(engine, split: str, rows: np.ndarray, checkpoint: int) -> float:
        return engine.distance(split, rows, checkpoint, level, normalized)
    return compute


def _mean_over_rows(values: np.ndarray, rows: np.ndarray) -> float:
    return float(np.mean(values[rows])) if rows.size else np.nan


def _consistency(engine, split: str, rows: np.ndarray, checkpoint: int) -> float:
    return _mean_over_rows(engine.consistency_all(split, checkpoint)[0], rows)


def _complexity(engine, split: str, rows: np.ndarray, checkpoint: int) -> float:
    return 1.0 - _consistency(engine, split, rows, checkpoint)


def _pathway_length(engine, split: str, rows: np.ndarray, checkpoint: int) -> float:
    return _mean_over_rows(engine.paths.lengths(split, checkpoint, engine.options.tau), rows)


def _routing_entropy(engine, split: str, rows: np.ndarray, checkpoint: int) -> float:
    return _mean_over_rows(engine.routing_entropy(split, checkpoint), rows)


def _answer_aligned(engine, split: str, rows: np.ndarray, checkpoint: int) -> float:
    options = engine.options
    return engine.answer_aligned(split, rows, checkpoint, options.distance_level, options.distance_normalized)


def _consistency_unbounded_share(engine, split: str, rows: np.ndarray, checkpoint: int) -> float:
    return _mean_over_rows(engine.consistency_all(split, checkpoint)[1], rows)


for _metric in (
    Metric("distance", _primary_distance, "primary", "distance", "pathway distance",
           "pathway edit distance (edit operations)", family="distance", table_label="pathway distance (memorized)",
           plot="analysis", partial=True, paper_sign=-1.0),
    Metric("consistency", _consistency, "primary", "consistency", "pathway consistency",
           "consistency (mean / max layer cosine)", family="consistency",
           table_label="pathway consistency (memorized)", plot="analysis", partial=True, paper_sign=1.0,
           orientation="1 - C"),
    # The paper's plotted "consistency" may be the formula's C itself (docs/method.md, Metric 2): the
    # protocol tests C with the paper's sign for consistency too.
    Metric("complexity", _complexity, "derived", "consistency read as C", "pathway complexity",
           "complexity (1 - consistency, unitless)", family="consistency", paper_sign=1.0, orientation="C"),
    Metric("pathway_length", _pathway_length, "control", "pathway length", "pathway length",
           "pathway length (experts / layer)", table_label="control: pathway length (experts / layer)",
           plot="analysis"),
    Metric("routing_entropy", _routing_entropy, "control", "routing entropy", "routing entropy",
           "routing entropy (nats)", table_label="control: routing entropy (nats)", plot="analysis"),
    Metric("distance_char", distance_form("char", False), "variant", "character distance",
           "character distance (paper)", "pathway edit distance (characters)", family="distance",
           plot="distances", computed_on=VARIANT_SCOPES, partial=True, level="char", normalized=False),
    Metric("distance_char_normalized", distance_form("char", True), "variant", "length-normalized distance",
           "length-normalized distance", "edit distance / longer pathway (fraction)", family="distance",
           table_label="distance, length-normalized", plot="distances", computed_on=VARIANT_SCOPES, partial=True,
           level="char", normalized=True, paper_sign=-1.0),
    Metric("distance_token", distance_form("token", False), "variant", "token-level distance",
           "token-level distance", "pathway edit distance (experts)", family="distance",
           table_label="distance, token level", plot="distances", computed_on=VARIANT_SCOPES, partial=True,
           level="token", normalized=False),
    # Round 4's exploratory candidate (docs/protocol.md): do samples that share their answer route alike?
    # Registered sign -1: a model that has found the algorithm may route by the answer (a lookup table need not).
    Metric("answer_aligned", _answer_aligned, "exploratory", "answer alignment", "answer-aligned routing",
           "same-answer minus random-pair distance (edit operations)", table_label="answer alignment (memorized)",
           computed_on=("sets",), paper_sign=-1.0, requires="answers"),
    Metric("consistency_unbounded_share", _consistency_unbounded_share, "diagnostic", "unbounded consistency share",
           "samples with unbounded consistency", "share of samples (0 to 1)"),
):
    register(_metric)
del _metric
