"""Report files of an analysis (analysis.analyze's dict).

  summary.json        the whole report (strict JSON: NaN written as null; `read_summary` reads it back)
  per_checkpoint.csv  step, domain, group, set, metric, value (every curve, long format)
  table1.csv          domain, metric, window, n, pearson_r, pearson_p, spearman_r, spearman_p (and every
                      set's partial correlations: metric "<set>/<metric>|entropy,length", window "window_partial")
  groups.csv          Pretrain@ groups: size and trend after t* of every metric and control
  pairs.csv           Pretrain@p -> Test@q pairs and their delays
  sweeps.csv          tau sweep and (eps, delta) sweep rows
  param_dynamics.csv  weight-change speed and stability per family between checkpoints
  table.txt           the human-readable summary (format_table)
  *.png               plots (report.plots)
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from typing import Any

from moe_grok import atomic_files, strict_json
from moe_grok.analysis import registry

DOMAIN_ROWS = (  # (key in a domain's table1, label) of the domain's own curves
    ("train_loss", "training loss"),
    ("train_loss_moving_average", "training loss, moving average"),
    ("validation_loss", "validation loss"),
    ("training_step", "baseline: training step"),  # with analysis.step_baseline
)
CONTROL_SET_LABELS = {"held_out": "held-out test samples", "random_train": "random non-memorized train"}
SHORT_CONTROL_LABELS = {"held_out": "held-out", "random_train": "random train"}  # rows of the exploratory metrics


def table1_rows() -> list[tuple[str, str]]:
    """(key in a domain's table1, label) of every Table 1 row, from the metric registry: the
    paper's metrics on the memorized samples, the domain's losses, the metrics' variants, the
    paper's metrics on every control set, the exploratory metrics on the memorized and every control
    set, then the confounds (pathway length, routing entropy). A report shows the rows it has."""
    primary = registry.metrics(role="primary")
    rows = [(f"memorized/{m.name}", m.table_label) for m in primary]
    rows += DOMAIN_ROWS
    rows += [(f"memorized/{m.name}", m.table_label) for m in registry.metrics(role="variant") if m.table_label]
    rows += [(f"{name}/{m.name}", f"control: {m.label} ({label})") for name, label in CONTROL_SET_LABELS.items()
             for m in primary]
    exploratory = registry.metrics(role="exploratory")
    rows += [(f"memorized/{m.name}", m.table_label) for m in exploratory]
    rows += [(f"{name}/{m.name}", f"control: {m.label} ({label})") for name, label in SHORT_CONTROL_LABELS.items()
             for m in exploratory]
    rows += [(f"memorized/{m.name}", m.table_label) for m in registry.metrics(role="control") if m.table_label]
    return rows


# Report entries where null means "not set" (not a missing number): `read_summary` keeps them None.
NULLABLE_ENTRIES = ("options", "in_target_range")


def read_summary(path: str) -> dict[str, Any]:
    """A summary.json written by `write_report`, with every null number back as NaN."""
    return strict_json.nan_for_null(strict_json.load(path), keep=NULLABLE_ENTRIES)


def _number(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"


def _signed(value, width: int = 6) -> str:
    return f"{'n/a':>{width}}" if value is None or math.isnan(value) else f"{value:>+{width}.2f}"


def format_table(report: dict[str, Any]) -> str:
    """Per domain: memorization, groups, pairs and delays, and Table 1 (window and full range)."""
    lines = [f"routing positions: {report['positions']}; checkpoints {report['steps'][0]}..{report['steps'][-1]} "
             f"({len(report['steps'])})"]
    for domain, d in report["domains"].items():
        m = d["memorization"]
        eps_text = (f"eps {m['eps']:.4g} nats ({m['eps_source']}"
                    + (f", grid step {report['options']['eps_grid_step']} x {m.get('eps_unit')}" if m.get('eps_unit')
                       else "") + ")")
        range_text = {True: "in the target range", False: "OUTSIDE the target range", None: "fixed eps"}[
            m["in_target_range"]]
        lines += ["", f"== {domain}: {d['n_train']} training samples; {eps_text}: "
                      f"{m['share_before_end']:.1%} memorized before the last checkpoint ({range_text}); "
                      f"{len(d['pretrain_groups'])} Pretrain@ groups, {len(d['test_groups'])} Test@ groups"]
        if "window" in d:
            w = d["window"]
            lines.append(f"   test onset {d['test_onset_step']}; correlation window {w['start_step']}..{w['end_step']}"
                         f" (n={w['n']})")
        for pair in d["pairs"]:
            lines.append(f"   {pair['pretrain']:>16} -> {pair['test']:<14} delay {pair['delay']:>+7}")
        if "table1" in d:
            lines.append(f"   {'metric':<50}{'window P':>9}{'S':>7}{'p':>9}{'full P':>9}{'S':>7}")
            for key, label in table1_rows():
                if key not in d["table1"]:
                    continue
                w, f = d["table1"][key]["window"], d["table1"][key]["full"]
                lines.append(f"   {label:<50}{_signed(w['pearson_r'], 9)}{_signed(w['spearman_r'], 7)}"
                             f"{w['pearson_p']:>9.2g}{_signed(f['pearson_r'], 9)}{_signed(f['spearman_r'], 7)}")
            for metric, partial in d.get("partial_correlations", {}).get("memorized", {}).items():
                lines.append(f"   partial r({metric}, test acc | entropy, length) = "
                             f"{_signed(partial['r'], 5)} (n={partial['n']})")
    for warning in report.get("warnings", []):
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def _curve_rows(report: dict[str, Any]):
    for domain, d in report["domains"].items():
        yield from ((domain, "", "domain", metric, values) for metric, values in d["curves"].items())
        for set_name, s in d["sets"].items():
            yield from ((domain, "", set_name, metric, values) for metric, values in s["curves"].items())
        for name, g in d["pretrain_groups"].items():
            yield from ((domain, name, "group", metric, values) for metric, values in g["curves"].items())
            for control, curves in g["controls"].items():
                yield from ((domain, name, control, metric, values) for metric, values in curves.items())
            yield from ((domain, name, "cross", metric, values) for metric, values in g["cross"].items())
        for name, g in d["test_groups"].items():
            yield domain, name, "test_group", "accuracy", g["accuracy"]
    for pair, values in report["cross_domain_distance"].items():
        yield pair, "", "cross_domain", "distance", values
    yield from (("global", "", "memorized", metric, values) for metric, values in report["global"]["curves"].items())


def _csv_writer(rows_of) -> Callable[[str], None]:
    """A file writer (atomic_files.write_files) of the CSV rows `rows_of()` yields."""
    def write(path: str) -> None:
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(rows_of())
    return write


def _per_checkpoint_rows(report: dict[str, Any]):
    yield ["step", "domain", "group", "set", "metric", "value"]
    steps = report["steps"]
    for domain, group, set_name, metric, values in _curve_rows(report):
        yield from ([step, domain, group, set_name, metric, _number(v)] for step, v in zip(steps, values, strict=False))


def _table1_rows(report: dict[str, Any]):
    yield ["domain", "metric", "window", "n", "pearson_r", "pearson_p", "spearman_r", "spearman_p"]
    for domain, d in report["domains"].items():
        for metric, by_window in d.get("table1", {}).items():
            for window, c in by_window.items():
                yield [domain, metric, window, c["n"], *(_number(c[k]) for k in
                                                         ("pearson_r", "pearson_p", "spearman_r", "spearman_p"))]
        for set_name, partial in d.get("partial_correlations", {}).items():
            for metric, c in partial.items():
                yield [domain, f"{set_name}/{metric}|entropy,length", "window_partial", c["n"], _number(c["r"]),
                       _number(c["p"]), "", ""]


def _groups_rows(report: dict[str, Any]):
    yield ["domain", "group", "step", "n", "set", "metric", "slope_per_1k_steps", "ci95_low", "ci95_high", "p",
           "n_points"]
    for domain, d in report["domains"].items():
        for name, g in d["pretrain_groups"].items():
            for set_name, trends in (("group", g["trend_after_t_star"]), *g["control_trends"].items()):
                for metric, t in trends.items():
                    yield [domain, name, g["step"], g["n"], set_name, metric, _number(t["slope"]),
                           _number(t["ci95"][0]), _number(t["ci95"][1]), _number(t["p"]), t["n"]]


def _pairs_rows(report: dict[str, Any]):
    yield ["domain", "pretrain", "test", "pretrain_step", "test_step", "delay", "similarity"]
    for domain, d in report["domains"].items():
        yield from ([domain, p["pretrain"], p["test"], p["pretrain_step"], p["test_step"], p["delay"],
                     _number(p["similarity"])] for p in d["pairs"])


def _sweeps_rows(report: dict[str, Any]):
    yield ["domain", "sweep", "tau", "delta", "eps_multiple", "eps", "share_before_end", "n_groups",
           "distance_window_pearson", "consistency_window_pearson"]
    for domain, d in report["domains"].items():
        for tau, t in d.get("tau_sweep", {}).items():
            yield [domain, "tau", tau, "", "", "", "", "", _number(t["correlation"]["pearson_r"]), ""]
        for row in d["eps_delta_sweep"]:
            yield [domain, "eps_delta", "", row["delta"], row["eps_multiple"], _number(row["eps"]),
                   _number(row["share_before_end"]), row["n_groups"],
                   _number(row.get("distance_correlation", {}).get("pearson_r")),
                   _number(row.get("consistency_correlation", {}).get("pearson_r"))]


def _param_dynamics_rows(report: dict[str, Any]):
    columns = ("step_from", "step_to", "family", "relative_change", "speed_per_1k_steps", "stability",
               "normalized_norm_change")
    yield list(columns)
    yield from ([row.get(c, "") for c in columns] for row in report["parameter_dynamics"])  # older reports lack some


def _text_writer(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return write


def report_writers(report: dict[str, Any], out_dir: str, with_plots: bool = True
                   ) -> dict[str, Callable[[str], None]]:
    """{path in out_dir: function writing that file at the path it is given} for every file of
    the module docstring (the PNGs only `with_plots`), for atomic_files.write_files."""
    writers = {
        "summary.json": _text_writer(strict_json.dumps(report, indent=1)),
        "per_checkpoint.csv": _csv_writer(lambda: _per_checkpoint_rows(report)),
        "table1.csv": _csv_writer(lambda: _table1_rows(report)),
        "groups.csv": _csv_writer(lambda: _groups_rows(report)),
        "pairs.csv": _csv_writer(lambda: _pairs_rows(report)),
        "sweeps.csv": _csv_writer(lambda: _sweeps_rows(report)),
        "param_dynamics.csv": _csv_writer(lambda: _param_dynamics_rows(report)),
        "table.txt": _text_writer(format_table(report) + "\n"),
    }
    if with_plots:
        from moe_grok.report import plots  # matplotlib: imported only where figures are drawn

        writers.update(plots.figure_writers(report))
    return {os.path.join(out_dir, name): write for name, write in writers.items()}


def write_report(report: dict[str, Any], out_dir: str, with_plots: bool = True) -> dict[str, str]:
    """Every file of the module docstring in out_dir (the PNGs only `with_plots`); returns {file name: path}.

    The files are written as a set (atomic_files.write_files): each aside, then all renamed, so a
    failure while writing (a full disk: WriteError naming the file) leaves the previous report's
    files as they were, not a mix of two reports."""
    os.makedirs(out_dir, exist_ok=True)
    writers = report_writers(report, out_dir, with_plots)
    atomic_files.write_files(writers)
    return {os.path.basename(path): path for path in writers}
