"""PathwayMonitor: the paper's routing metrics with their controls, live, from any training loop.

At each `update(step, outputs, router)` the monitor takes the per-sample routing, loss and
correctness of its fixed probe sets at that step (computed by the caller's forward pass), adds
them to its history and returns the step's metrics: for every data domain, every metric of the
registry's "sets" scope (`analysis.registry`) on the memorized set and its two controls (held-out
samples, random non-memorized training samples; `set_metrics.memorized_set_and_controls`), the
memorized-minus-held-out contrast, and the online memorization detector (the analysis' rule,
`analysis.memorization`, on the steps seen so far: provisional until `finish()`). The history is
the per-checkpoint statistics the analysis reads, so `report()` is `analyze()` over the monitored
steps (docs/monitor.md).
"""
from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from moe_grok import pipeline, strict_json
from moe_grok.analysis.checkpoint_stats import CheckpointStats
from moe_grok.analysis.memorization import memorization
from moe_grok.analysis.options import POSITIONS, AnalysisOptions
from moe_grok.analysis.run_warnings import RunWarnings
from moe_grok.analysis.set_metrics import SetMetrics, memorized_set_and_controls, rows_at
from moe_grok.monitor.history import HISTORY_FORMAT, MonitorHistory, checkpoint_name, complete_fields
from moe_grok.monitor.probes import ProbeSet, probe_set

PREFIX = "monitor"  # every scalar name starts with it
SETS = ("memorized", "held_out", "random_train")  # a domain's sets, in the order of the report
CONTRAST = "contrast"  # memorized minus held_out
_TUPLE_OPTIONS = ("target_fraction", "tau_sweep", "delta_sweep", "eps_sweep", "positions")
_PER_SAMPLE_AXES = {"mean_weights": 3, "scored_mean_weights": 3, "routing_entropy": 2, "scored_routing_entropy": 2,
                    "loss": 1, "correct": 1}


class ScalarWriter(Protocol):
    """Where the monitor's per-step scalars go (moe_grok.writers has TensorBoard and JSONL ones)."""

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class _DetectorWarnings(RunWarnings):
    """The detector's calibration warnings, kept quiet: it reruns at every step; the report lists them once."""

    def warn(self, message: str) -> None:
        self.messages.append(message)


def _numpy(x: Any) -> np.ndarray:
    """A numpy array of a numpy / jax array or a torch tensor (duck typed: the core imports no torch)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _options_from_json(value: dict[str, Any]) -> AnalysisOptions:
    value = dict(value)
    for name in _TUPLE_OPTIONS:
        value[name] = tuple(value[name])
    return AnalysisOptions(**value)


@dataclasses.dataclass(frozen=True)
class ProbeRoles:
    """Which probe plays which part: the watched training samples, the held-out control (never
    trained on), the validation set (loss only) and the test set (its correctness is the test accuracy)."""

    train: str = "train"
    held_out: str | None = "held_out"
    validation: str | None = None
    test: str | None = None


class PathwayMonitor:
    """Per-step pathway metrics with their controls, an online memorization detector, and a history
    whose report is the analysis' (module docstring; docs/monitor.md).

    probes: {name: probe set}, each an EvalSplit, a ProbeSet, a sample count (one domain) or
    per-sample domain labels. train / held_out / validation / test: the probe names of each role
    (held_out, validation, test: None for none). options: the analysis options (tau, eps
    calibration, pair sampling, control seed...); positions: "all" or "scored" routing for the
    per-step metrics (default options.positions[0]). directory: where the history is stored; a
    monitor on a directory holding a history resumes it (same probe sets and roles; its options
    and positions are recorded as the history's own, for report_from_history).
    writers: objects with write_scalars(step, scalars), flush(), close(), given every update's metrics.
    Thread safety: one monitor per run; calls on one monitor are serialized by a lock.
    """

    def __init__(self, probes: Mapping[str, Any], train: str = "train", held_out: str | None = "held_out",
                 validation: str | None = None, test: str | None = None,
                 options: AnalysisOptions | None = None, positions: str | None = None,
                 directory: str | None = None, writers: Sequence[ScalarWriter] = (), prefix: str = PREFIX):
        self.probes = {name: probe_set(spec) for name, spec in probes.items()}
        self.roles = ProbeRoles(train, held_out, validation, test)
        for role, name in dataclasses.asdict(self.roles).items():
            if name is not None and name not in self.probes:
                raise ValueError(f"the {role} probe {name!r} is not among the probes {sorted(self.probes)}")
        self.options = options or AnalysisOptions()
        self.positions = positions or self.options.positions[0]
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {tuple(POSITIONS)}, got {self.positions!r}")
        self.writers = list(writers)
        self.prefix = prefix
        self.final = False
        self._stats: list[CheckpointStats] = []
        self._lock = threading.RLock()
        self._history = None if directory is None else MonitorHistory(directory)
        if self._history is not None:
            self._resume_or_record()

    # --------------------------------------------------------------------------------------------
    # construction from / recording to a history
    # --------------------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {"probes": {name: p.to_json() for name, p in self.probes.items()},
                "roles": dataclasses.asdict(self.roles), "options": dataclasses.asdict(self.options),
                "positions": self.positions, "prefix": self.prefix}

    def _resume_or_record(self) -> None:
        meta = self._meta()
        stored = self._history.read_meta()
        if stored is None:
            self._history.write_meta(meta)
        else:
            # The history is the probes' statistics: another probe set or role makes it another run's;
            # other options only change what is computed from it (the newest are recorded).
            if stored.get("format") != HISTORY_FORMAT:
                raise ValueError(f"{self._history.meta_path} is a monitor history of format {stored.get('format')}, "
                                 f"this version reads format {HISTORY_FORMAT}")
            current = strict_json_round_trip(meta)
            differing = [k for k in ("probes", "roles") if stored.get(k) != current.get(k)]
            if differing:
                raise ValueError(f"{self._history.meta_path} records another monitor (other {' and '.join(differing)}"
                                 "); use another directory or the same probe sets and roles")
            if stored != {"format": stored.get("format"), **current}:
                self._history.write_meta(meta)
        self._stats = self._history.read_all()

    @classmethod
    def from_history(cls, directory: str, writers: Sequence[ScalarWriter] = ()) -> PathwayMonitor:
        """The monitor whose history `directory` holds (probes, roles and options from its monitor.json)."""
        meta = MonitorHistory(directory).read_meta()
        if meta is None:
            raise FileNotFoundError(f"no monitor history in {directory} (no {os.path.join(directory, 'monitor.json')})")
        probes = {name: ProbeSet.from_json(p) for name, p in meta["probes"].items()}
        return cls(probes, **meta["roles"], options=_options_from_json(meta["options"]), positions=meta["positions"],
                   directory=directory, writers=writers, prefix=meta["prefix"])

    # --------------------------------------------------------------------------------------------
    # the per-step interface
    # --------------------------------------------------------------------------------------------
    def _checked_outputs(self, step: int, outputs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
        missing = sorted(set(self.probes) - set(outputs))
        if missing:
            raise ValueError(f"step {step}: no outputs for probe(s) {missing} (every probe is needed at every step)")
        splits = {}
        for name, probe in self.probes.items():
            fields = {field: _numpy(values) for field, values in outputs[name].items() if field in _PER_SAMPLE_AXES}
            absent = [f for f in ("mean_weights", "routing_entropy", "loss") if f not in fields]
            if absent:
                raise ValueError(f"step {step}, probe {name!r}: outputs lack {absent}")
            n, layers = len(probe), fields["mean_weights"].shape[1:2]
            for field, values in fields.items():
                if values.ndim != _PER_SAMPLE_AXES[field] or values.shape[0] != n or (
                        values.ndim >= 2 and values.shape[1:2] != layers):
                    raise ValueError(f"step {step}, probe {name!r}: {field} has shape {values.shape}; need "
                                     f"{['[N]', '[N, L]', '[N, L, E]'][_PER_SAMPLE_AXES[field] - 1]} with N = {n} "
                                     f"samples and the layers of mean_weights {fields['mean_weights'].shape}")
            if not np.all(np.isfinite(fields["loss"])):
                raise ValueError(f"step {step}, probe {name!r}: the loss has non-finite values")
            splits[name] = complete_fields({f: np.asarray(v, np.float32) for f, v in fields.items()})
        return splits

    def update(self, step: int, outputs: Mapping[str, Mapping[str, Any]], router: Any,
               param_sample: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Add one step's outputs to the history and return its metrics (also given to the writers).

        outputs: {probe: {"mean_weights": [N, L, E] token-mean router softmax, "routing_entropy":
        [N, L] (nats), "loss": [N] (nats), optional "correct": [N] (share of scored positions
        predicted exactly), optional "scored_mean_weights" / "scored_routing_entropy" (default: the
        unscored ones)}} for every probe (numpy, jax or torch arrays). router: [L, E, D] router
        matrices (pathway consistency). param_sample: analysis.param_dynamics.parameter_sample of
        the parameters (the report's parameter dynamics), or None.
        An update of a step at or before the newest one replaces the history from that step on
        (a resumed run redoing steps). Returns {name: float}: see `step_metrics`.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        splits = self._checked_outputs(step, outputs)
        router = np.asarray(_numpy(router), np.float32)
        layers = splits[self.roles.train]["mean_weights"].shape[1:3]
        if router.ndim != 3 or router.shape[:2] != layers:
            raise ValueError(f"step {step}: router has shape {router.shape}; need [L, E, D] with [L, E] = {layers}")
        sample = {k: np.asarray(_numpy(v)) for k, v in (param_sample or {}).items()}
        stats = CheckpointStats(step, checkpoint_name(step), splits, router, sample)
        with self._lock:
            self._stats = [s for s in self._stats if s.step < step] + [stats]
            if self._history is not None:
                self._history.write(stats)
                self._history.remove_after(step)
            self.final = False
            metrics = self.step_metrics()
            for writer in self.writers:
                writer.write_scalars(step, metrics)
        return metrics

    def truncate(self, after_step: int) -> None:
        """Forget the history after `after_step` (memory and directory): a training run resumed from
        its state at `after_step` that will not redo every monitored step after it (-1: everything)."""
        with self._lock:
            self._stats = [s for s in self._stats if s.step <= after_step]
            if self._history is not None:
                self._history.remove_after(after_step)

    def step_metrics(self) -> dict[str, float]:
        """The newest step's metrics, flat {name: float} (NaN where undefined):

        <prefix>/provisional: 1.0 while the run goes on (the memorized sets may change), 0.0 after
        finish(); <prefix>/checkpoints: steps in the history; per domain d:
        <prefix>/d/<set>/<metric> for every "sets"-scope registry metric and set of SETS (held_out
        only with a held-out probe holding d), <prefix>/d/contrast/<metric> = memorized - held_out,
        <prefix>/d/<set>/n (its samples), <prefix>/d/detector/{n_memorized, share_memorized, eps}
        (the memorization rule on the steps so far; eps in nats), <prefix>/d/train_loss (nats),
        and with those probes <prefix>/d/validation_loss, <prefix>/d/test_accuracy.
        Each metric is measured at the newest step only: an update costs O(1) in the history's
        length, apart from the detector's pass over the training losses [steps, N].
        """
        with self._lock:
            if not self._stats:
                return {}
            return self._step_metrics()

    def _domain_sets(self, steps: np.ndarray, loss: np.ndarray) -> dict[str, tuple[dict, np.ndarray, dict]]:
        """{domain: (detector entry, memorized before the newest step [n_domain] bool, sets)}: the
        memorization rule on the steps so far, and the sets it gives (memorized_set_and_controls)."""
        roles, train, out = self.roles, self.probes[self.roles.train], {}
        held_out = self.probes[roles.held_out] if roles.held_out else None
        for domain in train.group_names:
            rows = train.rows(domain)
            entry, t_star = memorization(domain, loss[:, rows], steps, self.options, _DetectorWarnings(steps))
            memorized = (t_star >= 0) & (t_star < steps[-1])
            in_held_out = held_out is not None and domain in held_out.group_names
            pool = held_out.rows(domain) if in_held_out else np.zeros(0, int)
            # The newest point of analyze()'s memorized set: the growing set is then {t* < newest step}, as one
            # checkpoint's rows (controls of its exact size, NaN below 2 samples); otherwise the fixed set
            # (early_groups needs a test onset, which a running training does not have).
            table_rows = [rows[memorized]] if self.options.memorized_set == "growing" else rows[memorized]
            out[domain] = entry, memorized, memorized_set_and_controls(
                domain, roles.train, table_rows, rows[~memorized], roles.held_out, pool, self.options.seed)
        return out

    def _set_values(self, sets_by_domain: dict[str, dict[str, tuple[str, np.ndarray]]]
                    ) -> dict[str, dict[str, dict[str, float]]]:
        """{domain: {set: {metric: value at the newest step}}} for every "sets"-scope registry metric,
        measured as the analysis measures it (a SetMetrics of the newest step alone: same arrays,
        same shapes, so the same compiled programs and the same numbers)."""
        engine = SetMetrics([self._stats[-1]], self.options, self.positions)
        return {domain: {name: {metric: float(curve[0])
                                for metric, curve in engine.set_curves(split, rows, "sets").items()}
                         for name, (split, rows) in sets.items()}
                for domain, sets in sets_by_domain.items()}

    def _step_metrics(self) -> dict[str, float]:
        p, roles, newest = self.prefix, self.roles, self._stats[-1]
        steps = np.array([s.step for s in self._stats])
        loss = np.stack([s.splits[roles.train]["loss"] for s in self._stats]).astype(np.float64)
        detected = self._domain_sets(steps, loss)
        values = self._set_values({domain: sets for domain, (_, _, sets) in detected.items()})
        out = {f"{p}/provisional": 0.0 if self.final else 1.0, f"{p}/checkpoints": float(len(self._stats))}
        train = self.probes[roles.train]
        for domain, (entry, memorized, sets) in detected.items():
            for name, (_, rows) in sets.items():
                out[f"{p}/{domain}/{name}/n"] = float(rows_at(rows, 0).size)
                out.update({f"{p}/{domain}/{name}/{metric}": v for metric, v in values[domain][name].items()})
            by_set = values[domain]
            for metric in by_set["memorized"]:  # the registry's "sets" metrics this engine measures
                contrast = by_set["memorized"][metric] - by_set["held_out"][metric] if "held_out" in by_set else np.nan
                out[f"{p}/{domain}/{CONTRAST}/{metric}"] = float(contrast)
            out[f"{p}/{domain}/detector/n_memorized"] = float(memorized.sum())
            out[f"{p}/{domain}/detector/share_memorized"] = float(memorized.mean())
            out[f"{p}/{domain}/detector/eps"] = float(entry["eps"])
            out[f"{p}/{domain}/train_loss"] = float(loss[-1, train.rows(domain)].mean())
            for role, field, name in ((roles.validation, "loss", "validation_loss"),
                                      (roles.test, "correct", "test_accuracy")):
                if role is not None and domain in self.probes[role].group_names:
                    role_rows = self.probes[role].rows(domain)
                    out[f"{p}/{domain}/{name}"] = float(newest.splits[role][field][role_rows].mean())
        return out

    def memorization_steps(self) -> dict[str, np.ndarray]:
        """{domain: [n_train of the domain] t* per training sample (-1: never)}: the detector's
        verdict on the steps seen so far (final after finish())."""
        with self._lock:
            steps = np.array([s.step for s in self._stats])
            loss = np.stack([s.splits[self.roles.train]["loss"] for s in self._stats]).astype(np.float64)
            train = self.probes[self.roles.train]
            return {d: memorization(d, loss[:, train.rows(d)], steps, self.options, _DetectorWarnings(steps))[1]
                    for d in train.group_names}

    def finish(self) -> dict[str, float]:
        """The run ended: the detector's verdict on every step is final. Returns the newest step's
        metrics with <prefix>/provisional = 0, gives them to the writers (at the newest step) and
        flushes them. A later update (the run extended) makes the verdict provisional again."""
        with self._lock:
            self.final = True
            metrics = self.step_metrics()
            if self._stats:
                for writer in self.writers:
                    writer.write_scalars(self._stats[-1].step, metrics)
            for writer in self.writers:
                writer.flush()
        return metrics

    def close(self) -> None:
        """Close the writers (the history needs no closing)."""
        with self._lock:
            for writer in self.writers:
                writer.close()
            self.writers = []

    def __enter__(self) -> PathwayMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------------------------------------
    # the history and its report
    # --------------------------------------------------------------------------------------------
    def stats(self) -> list[CheckpointStats]:
        """The history: one CheckpointStats per monitored step, ascending (what `analyze` reads)."""
        with self._lock:
            return list(self._stats)

    def _reports(self, **analyze_kwargs) -> list[dict[str, Any]]:
        roles = self.roles
        kwargs = {"train_split": roles.train, "test_split": roles.test, "held_out_split": roles.held_out,
                  "validation_split": roles.validation, "options": self.options, **analyze_kwargs}
        return pipeline.analyze_stats(self.stats(), self.probes, **kwargs)

    def report(self, **analyze_kwargs) -> dict[str, Any]:
        """The analysis' report over the history (`pipeline.analyze_stats`: `analyze` per positions
        with the checkpoints' names), the first positions' one. analyze_kwargs override the
        monitor's: options, test (TestResults), train_embeddings, test_embeddings, data_notes."""
        return self._reports(**analyze_kwargs)[0]

    def write_report(self, out_dir: str, with_plots: bool = True, **analyze_kwargs) -> dict[str, Any]:
        """The report files the pipeline writes (out_dir/report, written whole), from the history;
        returns the report."""
        reports = self._reports(**analyze_kwargs)
        options = analyze_kwargs.get("options", self.options)
        os.makedirs(out_dir, exist_ok=True)
        pipeline.write_reports(reports, options.positions, out_dir, with_plots)
        return reports[0]


def strict_json_round_trip(value: Any) -> Any:
    """`value` as it reads back from strict JSON (tuples as lists, NaN as None)."""
    return strict_json.loads(strict_json.dumps(value))


def report_from_history(history_dir: str, out_dir: str, with_plots: bool = True) -> dict[str, Any]:
    """The report of a monitor's stored history (`moe-grok report`): its files in out_dir/report
    (as the pipeline writes them); returns the report."""
    return PathwayMonitor.from_history(history_dir).write_report(out_dir, with_plots)
