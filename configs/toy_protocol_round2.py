"""Round 2 of the toy protocol (docs/protocol.md, "Round 2"): arm A's training regime moved further
toward the paper's, and its two controls; arm C is not re-run. Every key is a flag as in
configs/toy_protocol.py, e.g. --config.seeds=4.
"""
import importlib.util
import os


def _protocol_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_protocol.py")
    spec = importlib.util.spec_from_file_location("toy_protocol_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    import ml_collections

    config = _protocol_config()
    config.name = "protocol_round2"
    grokking = config.arms.grokking  # A2: round 1's arm A with the regime changes below
    grokking.train.label_smoothing = 0.1  # the optimized loss has a floor: a memorized sample's loss settles
    grokking.train.router_weight_decay = False  # the router free to specialize ...
    grokking.train.aux_loss_coef = 0.0  # ... without a load-balancing pull toward uniform routing
    grokking.task.train_fraction = 0.4  # a longer memorization plateau before grokking (round 1: 0.5)
    grokking.train.steps = 3000  # round 1: 2,000; grokking comes later with less data

    random_labels = grokking.copy_and_resolve_references()  # B1: memorizes, cannot generalize
    random_labels.task.random_labels = True
    no_weight_decay = grokking.copy_and_resolve_references()  # B2: memorizes, does not grok in the budget
    no_weight_decay.train.weight_decay = 0.0
    config.arms = ml_collections.ConfigDict(dict(grokking=grokking, random_labels=random_labels,
                                                 no_weight_decay=no_weight_decay))
    config.seeds_per_arm = ml_collections.ConfigDict(dict(grokking=0, random_labels=0, no_weight_decay=0))
    return config
