"""The toy protocol of docs/protocol.md: every arm, every seed (trained together), analysis, tables.

  python experiments/toy_protocol.py --workdir=runs/protocol

Writes results.json, protocol_results.md and figures to the workdir, and the page and figures to
config.docs_dir (default docs/results, relative to the current directory; --config.docs_dir= for
the workdir only). Re-running resumes: finished training and cached analyses are reused.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from moe_grok.studies import launch, protocol, protocol_pages

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "toy_protocol.py"), "Protocol config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/protocol", "Directory of every arm's runs and the results.")


def main(argv):
    del argv
    launch.quiet_logs()
    results = protocol.run(_CONFIG.value, _WORKDIR.value, command=" ".join(["python"] + sys.argv))
    print(protocol_pages.markdown(results, protocol.QUANTITIES))


if __name__ == "__main__":
    app.run(main)
