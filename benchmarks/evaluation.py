"""Evaluation: each split streamed alone vs all splits streamed together, one run.

  python benchmarks/evaluation.py                          # default toy config, batch 1024
  python benchmarks/evaluation.py --config=moe_grok/configs/toy_mixture.py
  python benchmarks/evaluation.py --batch_size=2048

Training evaluates tasks.evaluation_splits (train, test, validation) at every `eval_every` steps,
and hands those outputs to the analysis as its cache entries. The reference streams each split
alone (`extract_dataset` per split: each split's last batch is padded to the full batch size);
`extract_splits` streams the rows of all in batches that tile them. Outputs are checked equal up to
float rounding (a sample whose near-tied top-k choice flips with the batch size is counted; more
than 0.1% fail), then both are timed in interleaved rounds (seed-0 initial params: the forward's
cost does not depend on the values); prints the medians, the rows each computes and the ratio.
"""
from __future__ import annotations

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from moe_grok import configs

from timing import interleaved_times

_CONFIG = config_flags.DEFINE_config_file("config", configs.path("toy_grokking"), "Toy training config.")
_BATCH = flags.DEFINE_integer("batch_size", 1024, "Extraction batch size (the toy configs' evaluation and analysis).")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds.")


def main(argv):
    del argv
    from moe_grok.data import tasks
    from moe_grok.extraction.routing import extract_dataset, extract_splits, make_extractor, tiling_batch_size
    from moe_grok.training.run_config import model_config_of, task_spec
    from moe_grok.training.step import initial_params

    config = _CONFIG.value
    spec = task_spec(config)
    data = tasks.make_dataset(spec)
    model_config = model_config_of(config, spec)
    params = initial_params(model_config, seed=0)
    extractor = make_extractor(model_config)
    batch = _BATCH.value
    splits = {name: split.arrays() for name, split in tasks.evaluation_splits(data).items()}
    sizes = [len(arrays[0]) for arrays in splits.values()]

    def alone():
        return {name: extract_dataset(model_config, params, *arrays, batch_size=batch, extractor=extractor,
                                      progress=False) for name, arrays in splits.items()}

    def together():
        return extract_splits(model_config, params, splits, batch_size=batch, extractor=extractor, progress=False)

    reference, joined = alone(), together()
    differing = 0  # samples whose outputs differ beyond float rounding (a near-tied top-k choice flipped)
    for name in splits:
        close = np.ones(len(splits[name][0]), bool)
        for value, other in zip(reference[name].values(), joined[name].values(), strict=True):
            close &= np.isclose(other, value, rtol=1e-5, atol=1e-6).reshape(len(close), -1).all(axis=1)
        differing += int((~close).sum())
    if differing > 1e-3 * sum(sizes):
        raise SystemExit(f"{differing} samples differ between the two ways: more than near-ties explain")
    rows_alone = sum(-(-n // batch) * batch for n in sizes)
    tile = tiling_batch_size(sum(sizes), batch)
    rows_together = -(-sum(sizes) // tile) * tile
    times = interleaved_times({"alone": alone, "together": together}, _ROUNDS.value, settle_s=0.1)
    median = {name: float(np.median(t)) for name, t in times.items()}
    print(f"{' + '.join(map(str, sizes))} rows, batch {batch}, {_ROUNDS.value} rounds")
    print(f"  alone     median {median['alone'] * 1e3:8.1f} ms  ({rows_alone} rows computed)")
    print(f"  together  median {median['together'] * 1e3:8.1f} ms  ({rows_together} rows computed, batch {tile})")
    print(f"  samples differing beyond float rounding: {differing}")
    print(f"  alone / together: {median['alone'] / median['together']:.2f}x")


if __name__ == "__main__":
    app.run(main)
