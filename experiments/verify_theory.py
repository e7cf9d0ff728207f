"""Synthetic check of the routing-kernel theory (SPEC "Theory"): pathway edit distance vs d_eff,
generalization bound vs measured test error, over router seeds and cluster structures.

    python experiments/verify_theory.py --out=runs/theory

One-layer MoE of 16 one-hidden-layer ReLU experts, soft routing (--top_k=0; k > 0 masks to
the top-k softmax weights), random router FROZEN, experts trained with Adam. --router_scales
is the router's inverse temperature; several values vary routing sharpness beyond what router
seeds do (sharper routing = shorter pathways, so raw character edit distance also shrinks).
Writes results.csv, results.json and theory.png under --out.

    python experiments/verify_theory.py --toy_workdir=runs/toy --out=runs/theory_toy

instead follows a finished toy grokking run (experiments/toy_grokking.py): at every checkpoint,
the multi-layer routing Gram (K_l = 1) of a fixed sample of training examples, its d_eff and
the bound (targets: centered one-hot answers), next to the measured test error.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import time

from absl import app, flags, logging

from moe_grok import theory_synthetic as ts

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "runs/theory", "Output directory.")
flags.DEFINE_list("n_clusters", ["2", "4", "8"], "Cluster counts (cluster structures, crossed with --spreads).")
flags.DEFINE_list("spreads", ["0.3", "1.0"], "Within-cluster std relative to the centers (crossed with --n_clusters).")
flags.DEFINE_integer("router_seeds", 4, "Router seeds 0..N-1 per structure.")
flags.DEFINE_list("router_scales", ["1.0"], "Router inverse temperatures.")
flags.DEFINE_integer("top_k", 0, "0 = soft routing over all experts; k > 0 = top-k softmax weights, no renormalization.")
flags.DEFINE_integer("num_experts", 16, "Experts.")
flags.DEFINE_integer("width", 128, "Hidden width of each ReLU expert.")
flags.DEFINE_integer("dim", 100, "Input dimension.")
flags.DEFINE_integer("n_train", 200, "Training samples.")
flags.DEFINE_integer("n_test", 1000, "Held-out test samples.")
flags.DEFINE_float("noise_std", 0.1, "Label noise std s (also used in the bound).")
flags.DEFINE_float("lam", 0.1, "Ridge lam of the kernel, the bound and the training penalty.")
flags.DEFINE_bool("ridge_training", True, "Train with the (lam/n)|theta - theta_init|^2 penalty.")
flags.DEFINE_float("delta", 0.05, "Bound holds with probability 1 - delta.")
flags.DEFINE_float("c1", 1.0, "Constant C1 of the bias term.")
flags.DEFINE_float("tau", 0.7, "Pathway cumulative-weight threshold.")
flags.DEFINE_integer("steps", 500, "Full-batch Adam steps.")
flags.DEFINE_float("learning_rate", 3e-3, "Adam learning rate.")
flags.DEFINE_integer("data_seed", 0, "Seed of the cluster data (shared by all router seeds).")
flags.DEFINE_integer("expert_seed", 0, "Seed of the expert initialization (shared by all runs).")
flags.DEFINE_string("toy_workdir", None, "A toy grokking run: compute the bound along its checkpoints instead.")
flags.DEFINE_integer("toy_samples", 1000, "Training samples (seeded subset) for the toy-run Gram.")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint read at INFO
        logging.set_verbosity(logging.WARNING)
    start = time.time()
    if FLAGS.toy_workdir:
        rows = ts.toy_run_bounds(FLAGS.toy_workdir, FLAGS.toy_samples, FLAGS.lam, FLAGS.noise_std, FLAGS.delta,
                                 FLAGS.c1)
        print(ts.format_toy_bounds(rows))
        os.makedirs(FLAGS.out, exist_ok=True)
        with open(os.path.join(FLAGS.out, "toy_bounds.json"), "w") as f:
            json.dump(rows, f, indent=1)
        ts.save_toy_bound_plot(rows, os.path.join(FLAGS.out, "toy_bounds.png"))
        print(f"wrote {FLAGS.out}/toy_bounds.json, toy_bounds.png in {time.time() - start:.0f} s")
        return
    base = ts.SyntheticConfig(
        dim=FLAGS.dim, n_train=FLAGS.n_train, n_test=FLAGS.n_test, noise_std=FLAGS.noise_std,
        num_experts=FLAGS.num_experts, width=FLAGS.width, top_k=FLAGS.top_k, tau=FLAGS.tau,
        steps=FLAGS.steps, learning_rate=FLAGS.learning_rate, lam=FLAGS.lam, ridge_training=FLAGS.ridge_training,
        delta=FLAGS.delta, c1=FLAGS.c1, data_seed=FLAGS.data_seed, expert_seed=FLAGS.expert_seed,
    )
    structures = [(int(k), float(s)) for k in FLAGS.n_clusters for s in FLAGS.spreads]
    rows = ts.sweep_synthetic(
        base, structures, range(FLAGS.router_seeds), [float(s) for s in FLAGS.router_scales]
    )
    corr = ts.correlations(rows)
    print("\nCorrelations over runs:")
    print(ts.format_correlations(corr))

    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
        json.dump({"base_config": dataclasses.asdict(base), "runs": rows, "correlations": corr}, f, indent=1)
    ts.save_plots(rows, os.path.join(FLAGS.out, "theory.png"))
    print(f"\nwrote {FLAGS.out}/results.csv, results.json, theory.png in {time.time() - start:.0f} s")


if __name__ == "__main__":
    app.run(main)
