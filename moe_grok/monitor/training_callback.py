"""The pathway monitor as a training callback of moe_grok's own trainer (training/callbacks.py).

At the evaluation cadence it hands the evaluation's per-split outputs (`state.extracted`: no second
forward pass), the router matrices and the parameter sample to one PathwayMonitor per seed, with
the probe roles of the toy analysis (studies.toy_run.analyze_run): the "train" split watched, the
"test" split the held-out control and the test accuracy, "validation" the validation loss. Its
metrics join `state.metrics` before LogMetrics runs, so they land in metrics.jsonl; the history
goes to <seed workdir>/monitor/, from which `report_from_history` writes the full report.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import weakref
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from moe_grok.analysis.options import AnalysisOptions
from moe_grok.analysis.param_dynamics import parameter_sample
from moe_grok.model.params import router_matrices
from moe_grok.monitor.pathway_monitor import PathwayMonitor, ScalarWriter
from moe_grok.training.callbacks import RunState

HISTORY_DIR = "monitor"  # below a seed's workdir
# held_out: the validation half of the held-out pairs, independent of the test half that defines the accuracy
TOY_ROLES = {"train": "train", "held_out": "validation", "validation": "validation", "test": "test"}


@dataclasses.dataclass
class MonitorCallback:
    """Feeds each evaluation to the seed's PathwayMonitor and adds its metrics to `state.metrics`;
    at the schedule's last step the monitor's verdict is final (`PathwayMonitor.finish`).

    every_steps: the evaluation's cadence (config.train.eval_every): the monitor reads its outputs.
    options: the analysis options of the per-step metrics (config.analysis). make_writers: the
    scalar writers of a seed's monitor, given its RunState (None: metrics.jsonl only).
    Seeds run in threads: each seed's workdir gets its own monitor.
    """

    every_steps: int | None
    options: AnalysisOptions = dataclasses.field(default_factory=AnalysisOptions)
    make_writers: Callable[[RunState], Sequence[ScalarWriter]] | None = None
    at_end: bool = True
    before_checkpoint: bool = True  # its metrics are logged with the evaluation's
    name: str = "pathway_monitor"
    held_out_split: str = TOY_ROLES["held_out"]  # the held-out control's split: "validation" or "test"
    _monitors: dict = dataclasses.field(default_factory=dict, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def monitor_of(self, state: RunState) -> PathwayMonitor:
        """The monitor of the seed whose RunState this is: created, or resumed from its history, at
        first use; at the first call of each training invocation its history is cut back to the
        run's logged steps (a resumed run trimmed metrics.jsonl to its restored state, and may not
        redo every step monitored after it, e.g. with another eval_every)."""
        with self._lock:
            if state.workdir not in self._monitors:
                writers = self.make_writers(state) if self.make_writers is not None else ()
                monitor = PathwayMonitor(state.splits, **{**TOY_ROLES, "held_out": self.held_out_split},
                                         options=self.options, writers=writers,
                                         directory=os.path.join(state.workdir, HISTORY_DIR))
                self._monitors[state.workdir] = (monitor, None)
            monitor, invocation = self._monitors[state.workdir]
            if invocation is None or invocation() is not state:  # RunState: one per seed and invocation
                logged = state.metrics_log.rows() if state.metrics_log is not None else []
                monitor.truncate(logged[-1]["step"] if logged else -1)
                self._monitors[state.workdir] = (monitor, weakref.ref(state))
            return monitor

    def on_step(self, state: RunState) -> None:
        if state.extracted is None:
            return
        monitor = self.monitor_of(state)
        metrics = monitor.update(state.step, state.extracted, np.asarray(router_matrices(state.params), np.float32),
                                 parameter_sample(state.params))
        if state.step == state.total_steps:
            metrics = monitor.finish()
        state.metrics.update(metrics)

    def close(self) -> None:
        """Close every seed's monitor (its writers)."""
        with self._lock:
            for monitor, _ in self._monitors.values():
                monitor.close()


def monitor_callbacks(config: ml_collections.ConfigDict,
                      make_writers: Callable[[RunState], Sequence[ScalarWriter]] | None = None
                      ) -> list[MonitorCallback]:
    """[MonitorCallback] at the evaluation cadence when config.monitor.enabled, else [] (also for a
    config without a `monitor` section)."""
    section = config.get("monitor")
    if section is None or not section.enabled:
        return []
    return [MonitorCallback(config.train.eval_every, AnalysisOptions.from_config(config.analysis), make_writers,
                            held_out_split=config.analysis.get("held_out_split", TOY_ROLES["held_out"]))]
