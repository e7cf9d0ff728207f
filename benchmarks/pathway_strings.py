"""Pathway strings of a whole split: per-sample construction vs distinct-pattern codes, one run.

  python benchmarks/pathway_strings.py                  # toy mixture split: 9,400 samples, 4 layers, 8 experts
  python benchmarks/pathway_strings.py --samples=2000 --layers=16 --experts=64   # OLMoE-shaped

The analysis builds the pathway strings (and token tuples, single-layer strings) of every
sample of a split at every checkpoint. The reference builds one string per sample from its
expert lists (`pathway_string` over `pathway_expert_lists`); `strings_of(layer_pathways(...))`
builds one per distinct single-layer pathway and one per distinct sample pathway. Both are
checked equal, then timed in interleaved rounds; prints the medians and their ratio.
Weights: Dirichlet(`--concentration`) router weights per (sample, layer), seed 0.
"""
from __future__ import annotations

import numpy as np
from absl import app, flags

from timing import interleaved_times

_SAMPLES = flags.DEFINE_integer("samples", 9400, "Samples in the split.")
_LAYERS = flags.DEFINE_integer("layers", 4, "MoE layers.")
_EXPERTS = flags.DEFINE_integer("experts", 8, "Experts per layer.")
_CONCENTRATION = flags.DEFINE_float("concentration", 0.3, "Dirichlet concentration of the router weights.")
_TAU = flags.DEFINE_float("tau", 0.7, "Pathway threshold.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")


def main(argv):
    del argv
    from moe_grok.analysis import pathways

    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.full(_EXPERTS.value, _CONCENTRATION.value), size=(_SAMPLES.value, _LAYERS.value))
    tau = _TAU.value

    def per_sample():
        return [pathways.pathway_string(e) for e in pathways.pathway_expert_lists(weights, tau)]

    def codes():
        return pathways.strings_of(pathways.layer_pathways(weights, tau))

    if per_sample() != codes():
        raise SystemExit("the two constructions disagree")
    times = interleaved_times({"per_sample": per_sample, "codes": codes}, _ROUNDS.value, settle_s=0.1)
    median = {name: float(np.median(t)) for name, t in times.items()}
    print(f"{_SAMPLES.value} samples x {_LAYERS.value} layers x {_EXPERTS.value} experts, tau {tau}, "
          f"{_ROUNDS.value} rounds")
    for name, seconds in median.items():
        print(f"  {name:10s} median {seconds * 1e3:8.1f} ms")
    print(f"  per_sample / codes: {median['per_sample'] / median['codes']:.2f}x")


if __name__ == "__main__":
    app.run(main)
