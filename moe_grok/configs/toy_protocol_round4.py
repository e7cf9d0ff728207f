"""Round 4 of the toy protocol (docs/protocol.md, "Round 4"): arms A and A2 as registered, their two
controls each, A2 with a cosine learning-rate decay, and a late-grokking regime whose budget the
round-4 pilot fixes (toy_pilot_round4). Every key is a flag as in the toy_protocol config, e.g.
--config.seeds=4 or --config.arms.late.train.steps=5000.
"""
import os

import ml_collections

from moe_grok.studies.launch import config_module

_HERE = os.path.dirname(os.path.abspath(__file__))


def late_grokking(grokking_round2: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
    """The late-grokking regime: A2 with train fraction 0.3 (a long memorization plateau) and `steps`."""
    late = grokking_round2.copy_and_resolve_references()
    late.task.train_fraction = 0.3
    late.train.steps = steps
    return late


def get_config():
    protocol = config_module(_HERE, "toy_protocol")
    round2 = config_module(_HERE, "toy_protocol_round2").get_config()
    pilot = config_module(_HERE, "toy_pilot_round4")
    config = protocol.get_config()
    config.name = "protocol_round4"
    grokking = config.arms.grokking  # A: round 1's arm A, unchanged
    grokking_round2 = round2.arms.grokking  # A2: round 2's arm A2, unchanged
    cosine = grokking_round2.copy_and_resolve_references()
    cosine.train.cosine_decay_steps = cosine.train.steps  # A2-cos: A2 with its learning rate decayed to 0 at the end
    arms = dict(grokking=grokking, random_labels=config.arms.random_labels, no_weight_decay=config.arms.no_weight_decay,
                grokking_round2=grokking_round2, random_labels_round2=round2.arms.random_labels,
                no_weight_decay_round2=round2.arms.no_weight_decay, cosine_round2=cosine,
                late=late_grokking(grokking_round2, pilot.LATE_STEPS))
    for arm in arms.values():
        arm.analysis.pairing_embedding = "operands"  # pair Pretrain@t* and Test@t# groups by the operands (a, b)
        arm.analysis.answer_aligned = True  # the exploratory answer-aligned routing on every set
        arm.analysis.step_baseline = True  # Table 1's baseline row: the training step itself
    config.arms = ml_collections.ConfigDict(arms)
    config.seeds_per_arm = ml_collections.ConfigDict(dict(  # per-arm override of `seeds` (0 = use `seeds`)
        grokking=0, random_labels=0, no_weight_decay=0,  # seeds of round 1's arms (0 = use `seeds`)
        grokking_round2=0, random_labels_round2=0, no_weight_decay_round2=0,  # seeds of round 2's arms (0 = `seeds`)
        cosine_round2=0, late=0))  # seeds of round 4's own arms (0 = use `seeds`)
    assert set(config.seeds_per_arm) == set(arms)
    config.registered = ml_collections.ConfigDict(dict(  # round 4's primary criterion (docs/protocol.md)
        metrics=("distance_char_normalized", "answer_aligned"),  # H4's metric, then the exploratory one
        grokking_arms=("grokking", "grokking_round2"),  # its signed margin must be confirmed in each
        late_arms=("late",),  # grokking arms too when >= 6 of their seeds grok
        control_arms=("random_labels", "no_weight_decay", "random_labels_round2",
                      "no_weight_decay_round2"),  # ... and confirmed in none of these
        schedule_pairs=(("cosine_round2", "grokking_round2"),),  # (arm, reference): Table 1's schedule contrast
    ))
    return config
