"""Which verdicts changed between two generated protocol pages (protocol_pages.markdown): an earlier
round's page, written before the analysis was amended (issue 34), and a page of the same arms under the
amended analysis.

The earlier pages read H2 as |r(metric)| - |r(training loss)| (the sign ignored) and consistency as
1 - C; the amended page gives that reading as "H2 sign ignored (...)" and "(consistency, as 1 - C)",
beside the signed margin and consistency read as C. Each earlier verdict is compared with the amended
page's verdict under the SAME reading (what the analysis fixes changed) and listed beside the amended
readings (what the new readings add).
"""
from __future__ import annotations

import re
from typing import Any

from moe_grok.analysis import registry
from moe_grok.studies import protocol_pages

VIEWS = {"## Routing averaged over all tokens (the paper)": "all",
         "## Routing averaged over scored positions": "scored"}
# a verdict is a word, at times with its reason: "inconclusive (too few seeds with a value)"
_VERDICT = re.compile(r"^- (?P<arm>[^:]+): (?P<name>.+): \*\*(?P<verdict>\w+(?: \([^*]+\))?)\*\*$")
_NAME = re.compile(r"^(?P<hypothesis>H[123])(?P<unsigned> sign ignored)? \((?P<metric>[^)]+)\)$")


def page_verdicts(page: str) -> dict[str, dict[tuple[str, str], str]]:
    """{view ("all" / "scored"): {(arm, verdict name): verdict}} of a generated results page. Verdict
    names as the page writes them ("H2 (distance)", "H2 sign ignored (consistency, as C)"); round 4's
    registered verdicts (no arm) are left out."""
    out: dict[str, dict[tuple[str, str], str]] = {}
    view = None
    for line in page.splitlines():
        if line.startswith("## "):
            view = VIEWS.get(line)
            if view is not None:
                out[view] = {}
            continue
        match = _VERDICT.match(line)
        if view is not None and match and _NAME.match(match["name"]):
            out[view][(match["arm"], match["name"])] = match["verdict"]
    if not out:
        raise ValueError("the page has no verdicts under a routing-view heading (not a generated protocol page?)")
    return out


def _amended_names(name: str) -> tuple[str, list[str]]:
    """An earlier page's verdict name -> (the amended page's name for the same reading, the amended
    page's other readings of that hypothesis and metric family). An earlier page names a protocol
    metric as the code does ("distance", "consistency": consistency is 1 - C in both); the amended
    page names it with its orientation (protocol_pages.verdict_name), and the family's other
    oriented metrics (consistency read as C) are its other readings."""
    parts = _NAME.match(name)
    metrics = {m.name: m for m in registry.protocol_metrics()}
    if parts is None or parts["unsigned"] or parts["metric"] not in metrics:
        raise ValueError(f"{name!r} is not an earlier page's verdict name (H1-H3 of one of {sorted(metrics)})")
    hypothesis, metric = parts["hypothesis"], metrics[parts["metric"]]
    readings = [protocol_pages.verdict_name(metric.name)] + [
        protocol_pages.verdict_name(m.name) for m in metrics.values()
        if m.name != metric.name and m.orientation and m.family == metric.family]
    if hypothesis == "H2":
        same = f"H2 sign ignored ({readings[0]})"
        others = [f"H2 ({m})" for m in readings] + [f"H2 sign ignored ({m})" for m in readings[1:]]
    else:
        same = f"{hypothesis} ({readings[0]})"
        others = [f"{hypothesis} ({m})" for m in readings[1:]]
    return same, others


def verdict_changes(earlier: str, amended: str, arms: dict[str, str]) -> list[dict[str, Any]]:
    """One row per earlier verdict of the mapped arms: {"view", "arm", "amended_arm", "verdict" (the
    earlier page's name), "earlier", "amended" (same reading), "changed", "other_readings" {name:
    verdict}}. earlier / amended: the pages' text; arms: earlier arm -> amended arm (e.g. "grokking" ->
    "grokking_round2"). A mapped arm or reading missing from the amended page raises ValueError."""
    before, after = page_verdicts(earlier), page_verdicts(amended)
    rows = []
    for view, verdicts in before.items():
        for (arm, name), verdict in verdicts.items():
            if arm not in arms:
                continue
            new_arm = arms[arm]
            same, others = _amended_names(name)
            new = after.get(view, {})
            if (new_arm, same) not in new:
                raise ValueError(f"the amended page has no verdict {new_arm}: {same} ({view} tokens)")
            # changed: the verdict's word (a reason in parentheses is no change of verdict)
            changed = verdict.split(" (")[0] != new[(new_arm, same)].split(" (")[0]
            rows.append({"view": view, "arm": arm, "amended_arm": new_arm, "verdict": name, "earlier": verdict,
                         "amended": new[(new_arm, same)], "changed": changed,
                         "other_readings": {o: new[(new_arm, o)] for o in others if (new_arm, o) in new}})
    return rows


def markdown_table(rows: list[dict[str, Any]], label: str) -> str:
    """The rows as one markdown table (changed verdicts in bold); label names the earlier round."""
    lines = [f"| {label}: arm, routing view | verdict | earlier | amended, same reading | amended, other readings |",
             "|---|---|---|---|---|"]
    for row in rows:
        amended = f"**{row['amended']}** (was {row['earlier']})" if row["changed"] else row["amended"]
        others = "; ".join(f"{name}: {verdict}" for name, verdict in row["other_readings"].items()) or "-"
        lines.append(f"| {row['arm']} -> {row['amended_arm']}, {row['view']} | {row['verdict']} | {row['earlier']} "
                     f"| {amended} | {others} |")
    changed = sum(row["changed"] for row in rows)
    lines += ["", f"{changed} of {len(rows)} verdicts changed under the same reading."]
    return "\n".join(lines) + "\n"
