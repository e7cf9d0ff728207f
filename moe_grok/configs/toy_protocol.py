"""The toy protocol (docs/protocol.md): every arm is a full toy config, each trained over `seeds` seeds.

Arms A and B start from the toy_grokking config (the default run = arm A) and change only what
makes them the arm; arm C is the toy_mixture config; any key is a flag, e.g. --config.arms.mixture.train.steps=3000.
"""
import os

from moe_grok.studies.launch import config_module

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str):
    return config_module(_HERE, name).get_config()


def controls(grokking):
    """Arm B of an arm A: (B1 random labels: memorizes, cannot generalize; B2 weight decay 0:
    memorizes, does not grok in the budget), each arm A with that one setting changed."""
    random_labels = grokking.copy_and_resolve_references()
    random_labels.task.random_labels = True
    no_weight_decay = grokking.copy_and_resolve_references()
    no_weight_decay.train.weight_decay = 0.0
    return random_labels, no_weight_decay


def get_config():
    import ml_collections

    config = ml_collections.ConfigDict()
    config.seeds = 8  # seeds per arm (0..seeds-1), trained together
    config.seeds_per_arm = ml_collections.ConfigDict(dict(  # per-arm override of `seeds` (0 = use `seeds`)
        grokking=0, random_labels=0, no_weight_decay=0, mixture=0))  # seeds of that arm (0 = use `seeds`)
    config.name = "protocol"  # generated files: <name>_results.md, figures/<name>_accuracy.png, <name>_effects.png
    config.analysis_process = True  # analyse each arm in a spawned process while the next arm trains (False: inline)
    config.analysis_processes = 2  # spawned processes an arm's seeds are dealt over (each runs its seeds in threads)
    config.seed_plots = True  # draw the per-run report figures of each arm's first seed (False: none)
    config.docs_dir = "docs/results"  # also write the generated page here, its figures to figures/ ("" = workdir only)
    config.arms = ml_collections.ConfigDict()

    grokking = _load("toy_grokking")  # A: the default regime
    grokking.analysis.positions = ("all", "scored")  # pathways from all tokens (paper) and the answer only
    config.arms.grokking = grokking

    config.arms.random_labels, config.arms.no_weight_decay = controls(grokking)  # B1, B2

    mixture = _load("toy_mixture")  # C: four domains that grok at different times
    mixture.analysis.positions = grokking.analysis.positions
    config.arms.mixture = mixture
    return config
