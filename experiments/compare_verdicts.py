"""Which verdicts of an earlier protocol round changed under the amended analysis: compares the earlier
round's generated page with a page of the same arms re-run under the amended analysis.

  python experiments/compare_verdicts.py docs/results/protocol_round2_results.md \
      docs/results/protocol_round4_results.md "round 2" grokking=grokking_round2 \
      random_labels=random_labels_round2 no_weight_decay=no_weight_decay_round2

Prints a markdown table: each earlier verdict, the amended page's verdict under the same reading
(H2 with the sign ignored, consistency as 1 - C), and the amended readings beside it.
"""
import sys

from moe_grok.studies import verdict_changes


def main(earlier_path: str, amended_path: str, label: str, *arm_pairs: str) -> None:
    arms = dict(pair.split("=", 1) for pair in arm_pairs)
    with open(earlier_path) as earlier, open(amended_path) as amended:
        rows = verdict_changes.verdict_changes(earlier.read(), amended.read(), arms)
    print(verdict_changes.markdown_table(rows, label), end="")


if __name__ == "__main__":
    if len(sys.argv) < 5 or not all("=" in pair for pair in sys.argv[4:]):
        sys.exit(__doc__)
    main(*sys.argv[1:])
