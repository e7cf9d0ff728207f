"""Asynchronous multi-domain grokking (arm C of docs/protocol.md): add, sub, mul and div mod 59,
one domain each. Model and optimizer: toy_grokking's, except where noted; why the
settings noted here differ: docs/training.md, "Controls and the mixture"."""
import os

import ml_collections

from moe_grok.studies.launch import config_module


def get_config():
    config = config_module(os.path.dirname(os.path.abspath(__file__)), "toy_grokking").get_config()
    config.task = ml_collections.ConfigDict(dict(
        p=59,  # prime modulus
        ops=("add", "sub", "mul", "div"),  # operations, one data group (domain) each
        train_fraction=(0.7, 0.7, 0.5, 0.5),  # share of each operation's (a, b) pairs used for training, per op
        random_labels=False,  # replace the training answers by seeded random labels (a control)
        seed=0,  # split (and random label) seed
    ))
    config.train.grad_clip_norm = 0.0  # no gradient clipping
    config.train.warmup_steps = 10  # linear warmup, then constant
    config.train.steps = 3000  # optimizer steps
    return config
