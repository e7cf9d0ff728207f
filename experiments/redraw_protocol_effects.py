"""Redraw a toy protocol's effects figure from its generated results page (the protocol's workdirs are
not kept; the page's first table holds every quantity's mean [95% CI] (n) per arm, to 3 digits).

  python experiments/redraw_protocol_effects.py docs/results/protocol_results.md \
      docs/results/figures/protocol_effects.png

The accuracy figure cannot be redrawn this way: the page holds no accuracy curves.
"""
import sys

from moe_grok.studies import protocol, protocol_pages


def main(page_path: str, figure_path: str) -> None:
    with open(page_path) as f:
        results = protocol_pages.summaries_from_page(f.read(), protocol.QUANTITIES)
    print(protocol_pages.plot_effects(results, protocol.QUANTITIES, figure_path))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
