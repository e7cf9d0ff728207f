"""The round-4 late-grokking pilot (docs/protocol.md, "Round 4"): trains the late-grokking regime's seeds
0-7 in stages (3,000 steps, then +1,000 up to 6,000; each stage resumes the last) and stops at the first
stage where the registered rule holds: >= 6 of 8 seeds grok (grokking.grok_onset on the training log's
test accuracy, all held-out pairs) with their onset at least 500 steps before the stage's end. Only the
test accuracy of the training log is read: no analysis runs before the budget is fixed. Writes
<workdir>/pilot.json (every stage's onsets and the decision) and prints the budget:

  python experiments/toy_pilot_round4.py --workdir=runs/pilot_round4

The stopped workdir is the late arm's training (same config, same seeds): copy it to
runs/protocol_round4/late and set toy_pilot_round4.LATE_STEPS to the budget before the round-4 command.
"""
import os

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from moe_grok import configs, strict_json
from moe_grok.analysis import grokking
from moe_grok.studies import launch, protocol_stats
from moe_grok.training import multiseed
from moe_grok.training.metrics_log import read_metrics

_CONFIG = config_flags.DEFINE_config_file("config", configs.path("toy_pilot_round4"), "The late-grokking regime.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/pilot_round4", "Multi-seed workdir (resumed if it exists).")
_SEEDS = flags.DEFINE_integer("seeds", 8, "Seeds 0..seeds-1, trained together.")
_STAGES = flags.DEFINE_list("stages", ["3000", "4000", "5000", "6000"], "Stage ends (steps), in order.")


def seed_onset(seed_dir: str) -> int:
    """grokking.grok_onset (step, -1 = none) of the training log's test accuracy (all held-out pairs)."""
    rows = read_metrics(seed_dir)
    return grokking.grok_onset(np.array([m["test_accuracy"] for m in rows]), np.array([m["step"] for m in rows]))


def main(argv):
    del argv
    launch.quiet_logs()
    config = _CONFIG.value
    seeds = list(range(_SEEDS.value))
    stages, budget = [], None
    for stage in (int(s) for s in _STAGES.value):
        config.train.steps = stage
        seed_dirs = multiseed.train(config, _WORKDIR.value, seeds)
        onsets = [seed_onset(d) for d in seed_dirs]
        stops = protocol_stats.late_pilot_stops(onsets, stage)
        stages.append({"steps": stage, "onsets": onsets, "stops": stops})
        print(f"stage {stage}: onsets {onsets}; rule {'holds' if stops else 'does not hold'}", flush=True)
        if stops:
            budget = stage
            break
    strict_json.dump({"stages": stages, "budget": budget, "seeds": seeds},
                     os.path.join(_WORKDIR.value, "pilot.json"), indent=1)
    print(f"late arm budget: {budget} steps" if budget else
          f"the rule never held: the late arm runs at {stages[-1]['steps']} steps, reported as not reached")


if __name__ == "__main__":
    app.run(main)
