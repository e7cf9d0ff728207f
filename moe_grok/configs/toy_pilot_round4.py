"""The round-4 pilot (docs/protocol.md, "Round 4", the late-grokking pilot): the late-grokking regime alone,
trained in stages until >= 6 of 8 seeds grok by the registered rule (protocol_stats.late_pilot_stops):

  python experiments/toy_pilot_round4.py --workdir=runs/pilot_round4

The stage at which the rule holds becomes LATE_STEPS, the late arm's budget (set here before the round-4 run).
"""
import os

from moe_grok.studies.launch import config_module

_HERE = os.path.dirname(os.path.abspath(__file__))

FIRST_STAGE, CAP = 3000, 6000  # pilot stages: 3,000 steps, then +1,000 up to 6,000 (experiments/toy_pilot_round4.py)
LATE_STEPS = CAP  # the late arm's budget: the cap until the pilot fixes it (docs/protocol.md, Round 4)


def get_config():
    round2 = config_module(_HERE, "toy_protocol_round2").get_config()
    late = config_module(_HERE, "toy_protocol_round4").late_grokking(round2.arms.grokking, FIRST_STAGE)
    late.train.seed = 0  # first seed; the pilot trains seeds 0..seeds-1 together (the late arm's own seeds)
    return late
