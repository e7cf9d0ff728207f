"""Round 3 of the toy protocol (docs/protocol.md, "Round 3"): arm C with a longer budget, so that its
later domains (mul, div) can finish grokking; arms A and B are not re-run. Every key is a flag as in
the toy_protocol config, e.g. --config.seeds=4.
"""
import os

import ml_collections

from moe_grok.studies.launch import config_module


def get_config():
    config = config_module(os.path.dirname(os.path.abspath(__file__)), "toy_protocol").get_config()
    config.name = "protocol_round3"
    mixture = config.arms.mixture  # C3: round 1's arm C ...
    mixture.train.steps = 5000  # ... trained to 5,000 steps (round 1: 3,000); its first 3,000 steps are round 1's run
    config.arms = ml_collections.ConfigDict(dict(mixture=mixture))
    config.seeds_per_arm = ml_collections.ConfigDict(dict(mixture=0))
    return config
