"""Round 2 of the toy protocol (docs/protocol.md, "Round 2"): arm A's training regime moved further
toward the paper's, and its two controls; arm C is not re-run. Every key is a flag as in
the toy_protocol config, e.g. --config.seeds=4.
"""
import os

import ml_collections

from moe_grok.studies.launch import config_module


def get_config():
    protocol = config_module(os.path.dirname(os.path.abspath(__file__)), "toy_protocol")
    config = protocol.get_config()
    config.name = "protocol_round2"
    grokking = config.arms.grokking  # A2: round 1's arm A with the regime changes below
    grokking.train.label_smoothing = 0.1  # the optimized loss has a floor: a memorized sample's loss settles
    grokking.train.router_weight_decay = False  # the router free to specialize ...
    grokking.train.aux_loss_coef = 0.0  # ... without a load-balancing pull toward uniform routing
    grokking.task.train_fraction = 0.4  # a longer memorization plateau before grokking (round 1: 0.5)
    grokking.train.steps = 3000  # round 1: 2,000; grokking comes later with less data

    random_labels, no_weight_decay = protocol.controls(grokking)  # B1-2, B2-2
    config.arms = ml_collections.ConfigDict(dict(grokking=grokking, random_labels=random_labels,
                                                 no_weight_decay=no_weight_decay))
    config.seeds_per_arm = ml_collections.ConfigDict(dict(grokking=0, random_labels=0, no_weight_decay=0))
    return config
