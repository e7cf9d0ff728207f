"""Every choice of the analysis (docs/method.md) and the config section that declares them."""
from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from moe_grok.analysis import grokking

# positions -> (router weights field, routing entropy field) of CheckpointStats.splits
POSITIONS = {"all": ("mean_weights", "routing_entropy"), "scored": ("scored_mean_weights", "scored_routing_entropy")}
# Table 1's memorized set (docs/method.md, "Correlations with test accuracy"): at each checkpoint t the samples
# memorized by t (t* <= t, the paper's reading), the early Pretrain@t* groups, or every sample with t* < T.
MEMORIZED_SETS = ("growing", "early_groups", "fixed")


@dataclasses.dataclass(frozen=True)
class AnalysisOptions:
    """Every choice of the analysis (docs/method.md); `from_config` reads them from a config's `analysis`."""

    tau: float = 0.7  # pathway: experts kept until their cumulative token-mean weight exceeds tau
    delta: float = 0.05  # memorization: |loss(t) - loss(T)| <= delta for every t >= t* (in delta_unit)
    delta_unit: str = "nats"  # delta (and delta_sweep) in nats (paper), or "eps": multiples of eps
    target_fraction: tuple[float, float] = (0.20, 0.25)  # eps calibration: share memorized before T
    eps: float | None = None  # a fixed eps (nats) for every domain instead of calibration
    eps_grid_step: float = 0.1  # eps calibration grid step, in eps_unit
    eps_unit: str = "mean_final_loss"  # grid unit: the domain's average final loss (paper), its median, or "nats"
    distance_level: str = "char"  # primary distance: "char" (paper, pathway strings) or "token"
    distance_normalized: bool = False  # primary distance divided by the longer pathway's length
    max_pairs: int | None = 2000  # sampled pairs per distance (None, or 0 in a config: all pairs; < 0 refused)
    seed: int = 0  # pair sampling and control-sample seed
    onset_threshold: float = 0.8  # onsets: accuracy (group) / later mean correctness (sample) above this
    max_later_errors: int = 1  # a test sample's onset allows at most this many later errors
    rise_fraction: float = 0.1  # correlation window start: the sustained rise above min + this * range
    saturation_fraction: float = 0.95  # window end: accuracy reaches min + this * range (1.0: to T)
    loss_moving_average: int = 3  # checkpoints in the training-loss moving average (Table 1)
    tau_sweep: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8)  # Appendix E.1
    delta_sweep: tuple[float, ...] = (0.025, 0.05, 0.1)  # Appendix E.3 (with eps_sweep)
    eps_sweep: tuple[float, ...] = (0.5, 1.0, 2.0)  # Appendix E.3: multiples of the calibrated eps
    positions: tuple[str, ...] = ("all",)  # routing averaged over "all" tokens (paper) / "scored" positions
    memorized_set: str = "growing"  # Table 1's memorized set: one of MEMORIZED_SETS (growing: the paper's reading)
    early_group_min_size: int = 5  # memorized_set="early_groups": Pretrain@t* groups of at least this many samples
    answer_aligned: bool = False  # exploratory metric answer_aligned (needs one scored target per sample; round 4)
    step_baseline: bool = False  # Table 1 baseline row: the training step itself as a predictor (round 4)

    def __post_init__(self):
        problems = []
        if not 0.0 < self.tau <= 1.0 or not all(0.0 < t <= 1.0 for t in self.tau_sweep):
            problems.append(f"tau and tau_sweep must lie in (0, 1], got {self.tau}, {self.tau_sweep}")
        if not self.delta >= 0 or not all(d >= 0 for d in self.delta_sweep):
            problems.append(f"delta and delta_sweep must be >= 0, got {self.delta}, {self.delta_sweep}")
        low, high = self.target_fraction
        if not 0.0 <= low <= high <= 1.0:
            problems.append(f"target_fraction needs 0 <= low <= high <= 1, got {self.target_fraction}")
        if self.eps is not None and not self.eps > 0:
            problems.append(f"eps must be > 0 (or unset to calibrate), got {self.eps}")
        if not self.eps_grid_step > 0 or not all(m > 0 for m in self.eps_sweep):
            problems.append(f"eps_grid_step and eps_sweep must be > 0, got {self.eps_grid_step}, {self.eps_sweep}")
        if self.eps_unit not in grokking.EPS_UNITS:
            problems.append(f"eps_unit must be one of {grokking.EPS_UNITS}, got {self.eps_unit!r}")
        if self.delta_unit not in grokking.DELTA_UNITS:
            problems.append(f"delta_unit must be one of {grokking.DELTA_UNITS}, got {self.delta_unit!r}")
        if self.distance_level not in ("char", "token"):
            problems.append(f"distance_level must be 'char' or 'token', got {self.distance_level!r}")
        if self.max_pairs is not None and self.max_pairs < 1:
            problems.append(f"max_pairs must be >= 1 or None, got {self.max_pairs}")
        if not 0.0 < self.onset_threshold < 1.0:
            problems.append(f"onset_threshold must lie in (0, 1), got {self.onset_threshold}")
        if self.max_later_errors < 0 or self.loss_moving_average < 1:
            problems.append("max_later_errors must be >= 0 and loss_moving_average >= 1")
        if not 0.0 <= self.rise_fraction < 1.0 or not 0.0 < self.saturation_fraction <= 1.0:
            problems.append(f"rise_fraction must lie in [0, 1) and saturation_fraction in (0, 1], got "
                            f"{self.rise_fraction}, {self.saturation_fraction}")
        if not self.positions or any(p not in POSITIONS for p in self.positions):
            problems.append(f"positions must name some of {tuple(POSITIONS)}, got {self.positions}")
        if self.memorized_set not in MEMORIZED_SETS:
            problems.append(f"memorized_set must be one of {MEMORIZED_SETS}, got {self.memorized_set!r}")
        if self.early_group_min_size < 1:
            problems.append(f"early_group_min_size must be >= 1, got {self.early_group_min_size}")
        if problems:
            raise ValueError("invalid analysis options: " + "; ".join(problems))

    @classmethod
    def from_config(cls, config) -> AnalysisOptions:
        """From an ml_collections `analysis` section holding every field (extra keys such as
        batch_size are ignored); ValueError names missing fields and invalid values."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in config]
        if missing:
            raise ValueError(f"analysis config lacks {missing}; declare every AnalysisOptions field")
        values = {n: config[n] for n in names}
        for name in ("target_fraction", "tau_sweep", "delta_sweep", "eps_sweep", "positions"):
            values[name] = tuple(values[name]) if not isinstance(values[name], str) else (values[name],)
        # A config cannot hold None next to an int default on the command line: 0 spells "all pairs".
        # A negative value is refused (by __post_init__), not read as "all pairs".
        if values["max_pairs"] == 0:
            values["max_pairs"] = None
        return cls(**values)


def analysis_config(**overrides) -> ml_collections.ConfigDict:
    """An `analysis` config section declaring every AnalysisOptions field (its defaults, then
    `overrides`); unset eps is a float placeholder so `--config.analysis.eps=0.3` works."""
    fields = {f.name: f.default for f in dataclasses.fields(AnalysisOptions)}
    fields["eps"] = config_dict.placeholder(float)
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)
