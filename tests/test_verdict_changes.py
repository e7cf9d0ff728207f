"""Which verdicts of an earlier round changed: parsing generated pages and matching their readings."""
import pytest

from moe_grok.studies import protocol_pages, protocol_stats, verdict_changes

ALL = "## Routing averaged over all tokens (the paper)"
SCORED = "## Routing averaged over scored positions"


def _amended_page(verdict_of) -> str:
    """A page whose verdict lines are hypothesis_verdicts' own names (the amended analysis), with
    verdict_of(metric, criterion) as every criterion's verdict."""
    verdicts = {}
    for metric in protocol_stats.METRICS:
        for criterion in ("slope", "slope_minus_held_out", "signed_margin_over_loss", "margin_over_loss"):
            verdicts[f"h1_{metric}_{criterion}" if "slope" in criterion else f"h2_{metric}_{criterion}"] = (
                verdict_of(metric, criterion))
    results = {"arms": {"grokking_round2": {"positions": {"all": {"verdicts": verdicts, "per_seed": []}}}}}
    lines = [f"- {name}: **{verdict}**" for name, verdict in protocol_pages.hypothesis_verdicts(results, "all").items()]
    return "\n".join(["# page", "", ALL, "", "Verdicts (criteria of docs/protocol.md):", "", *lines, "", SCORED,
                      "", *lines, ""])


EARLIER = "\n".join(["# round 2", "", ALL, "", "Verdicts (criteria of docs/protocol.md):", "",
                     "- grokking: H1 (distance): **inconclusive**", "- grokking: H2 (distance): **refuted**",
                     "- grokking: H2 (consistency): **refuted**", "- no_weight_decay: H2 (distance): **confirmed**",
                     "", SCORED, "", "- grokking: H2 (distance): **confirmed**", ""])


def _verdict(metric, criterion):
    if criterion == "margin_over_loss":  # the earlier reading: sign ignored
        return "refuted"
    if criterion == "signed_margin_over_loss":
        return "confirmed" if metric == "complexity" else "inconclusive"
    return "inconclusive"


def test_each_earlier_verdict_meets_the_amended_verdict_of_the_same_reading():
    rows = verdict_changes.verdict_changes(EARLIER, _amended_page(_verdict), {"grokking": "grokking_round2"})
    assert [(r["view"], r["verdict"]) for r in rows] == [("all", "H1 (distance)"), ("all", "H2 (distance)"),
                                                        ("all", "H2 (consistency)"), ("scored", "H2 (distance)")]
    h1, h2_distance, h2_consistency, scored = rows
    assert (h1["amended"], h1["changed"]) == ("inconclusive", False)
    assert (h2_distance["amended"], h2_distance["changed"]) == ("refuted", False)  # sign ignored, as before
    assert h2_distance["other_readings"] == {"H2 (distance)": "inconclusive"}
    assert h2_consistency["other_readings"] == {"H2 (consistency, as 1 - C)": "inconclusive",
                                                "H2 (consistency, as C)": "confirmed",
                                                "H2 sign ignored (consistency, as C)": "refuted"}
    assert (scored["earlier"], scored["amended"], scored["changed"]) == ("confirmed", "refuted", True)
    table = verdict_changes.markdown_table(rows, "round 2")
    assert "1 of 4 verdicts changed" in table


def test_a_changed_verdict_is_marked_and_counted():
    page = _amended_page(lambda metric, criterion: "confirmed")
    rows = verdict_changes.verdict_changes(EARLIER, page, {"grokking": "grokking_round2"})
    assert [r["changed"] for r in rows] == [True, True, True, False]
    assert "**confirmed** (was refuted)" in verdict_changes.markdown_table(rows, "round 2")


def test_a_mapped_arm_the_amended_page_lacks_is_named():
    with pytest.raises(ValueError, match="no verdict random_labels_round2: H2 sign ignored"):
        verdict_changes.verdict_changes(
            "\n".join([ALL, "- random_labels: H2 (distance): **refuted**"]), _amended_page(_verdict),
            {"random_labels": "random_labels_round2"})
    with pytest.raises(ValueError, match="no verdicts"):
        verdict_changes.page_verdicts("# not a page\n")


def test_a_verdict_with_its_reason_is_read_and_the_reason_alone_is_no_change():
    reasons = lambda metric, criterion: ("inconclusive (too few seeds with a value)"
                                         if criterion == "margin_over_loss" else "inconclusive")
    earlier = "\n".join(["# round 1", "", ALL, "", "- grokking: H2 (distance): **inconclusive**",
                         "- grokking: H1 (distance): **inconclusive (too few seeds with a value)**", ""])
    rows = verdict_changes.verdict_changes(earlier, _amended_page(reasons), {"grokking": "grokking_round2"})
    by_name = {r["verdict"]: r for r in rows}
    assert by_name["H2 (distance)"]["amended"] == "inconclusive (too few seeds with a value)"
    assert by_name["H1 (distance)"]["earlier"] == "inconclusive (too few seeds with a value)"
    assert not any(r["changed"] for r in rows)
