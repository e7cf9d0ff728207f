"""A user's own small Flax MoE language model (not moe_grok's), trained with optax and watched by
moe_grok's PathwayMonitor through the Flax routing convention (`moe_grok.monitor.flax_routing`).

The convention asks two things of the model: each MoE layer sows its router logits
``[batch, seq, experts]`` as ``self.sow("intermediates", "router_logits", logits)``, and its router
is a bias-free ``nn.Dense(num_experts, name="router")``. Then `routing_from_flax` reads the routing
of a batch and `router_matrices_from_flax` the router matrices, in layer order. The corpus is byte
windows of two of this repository's docs (examples/byte_corpus.py), two data domains.

    python examples/flax_moe.py --workdir /tmp/flax_moe --steps 300

docs/integrations.md explains each step.
"""
from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from byte_corpus import VOCAB_SIZE, load_corpus

from moe_grok.data.splits import next_token_targets
from moe_grok.extraction.routing import per_sample_loss
from moe_grok.monitor import PathwayMonitor
from moe_grok.monitor.flax_routing import router_matrices_from_flax, routing_from_flax


class MoEBlock(nn.Module):
    """Token mixing with the previous position, then a top-k mixture of GELU experts."""

    num_experts: int = 8
    top_k: int = 2
    expert_width: int = 32

    @nn.compact
    def __call__(self, x):  # x: [batch, seq, hidden]
        previous = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        x = x + nn.Dense(x.shape[-1], name="mix")(previous)
        h = nn.LayerNorm(name="norm")(x)
        logits = nn.Dense(self.num_experts, use_bias=False, name="router")(h)  # [batch, seq, experts]
        self.sow("intermediates", "router_logits", logits)  # the convention: what the monitor reads
        top_weights, top_experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), self.top_k)
        gates = jnp.sum(jax.nn.one_hot(top_experts, self.num_experts) * top_weights[..., None], axis=-2)
        gates = gates / gates.sum(axis=-1, keepdims=True)  # [batch, seq, experts], top-k renormalized
        up = nn.DenseGeneral((self.num_experts, self.expert_width), name="up")(h)  # [batch, seq, experts, width]
        down = self.param("down", nn.initializers.lecun_normal(), (self.num_experts, self.expert_width, x.shape[-1]))
        experts = jnp.einsum("bsef,efd->bsed", nn.gelu(up), down)
        return x + jnp.einsum("bse,bsed->bsd", gates, experts)


class TinyMoELM(nn.Module):
    """Byte embeddings, `layers` MoE blocks (named layers_0, layers_1, ...: their order is the model's), a head."""

    layers: int = 3
    hidden: int = 32

    @nn.compact
    def __call__(self, tokens):  # tokens: [batch, seq] int
        x = nn.Embed(VOCAB_SIZE, self.hidden)(tokens)
        for index in range(self.layers):
            x = MoEBlock(name=f"layers_{index}")(x)
        return nn.Dense(VOCAB_SIZE, name="head")(nn.LayerNorm()(x))  # [batch, seq, vocab]


def init_params(shapes, seed: int):
    """Random params of the given shapes, drawn in numpy (for a model this small, cheaper than compiling
    flax's initializers): weights N(0, 0.1^2), LayerNorm scales 1, biases 0."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "bias"):
            return np.full(leaf.shape, 1.0 if name == "scale" else 0.0, np.float32)
        return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def main(workdir: str, steps: int = 300, eval_every: int = 30, batch_size: int = 8, seed: int = 0,
         with_plots: bool = True) -> dict:
    """Train for `steps` steps with the monitor; returns {"metrics": the final step's metrics,
    "history_dir": the monitor's history, "report_dir": the report}."""
    corpus = load_corpus(seed=seed)
    model = TinyMoELM()
    params = init_params(jax.eval_shape(model.init, jax.random.key(seed), corpus.train[:1])["params"], seed)
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    @jax.jit
    def train_step(params, opt_state, tokens):
        grads = jax.grad(loss_fn)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def probe(params, tokens, mask, targets, target_mask):
        """(the sown intermediates, per-sample loss [N] and correctness [N]) of a probe set."""
        logits, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
        return state["intermediates"], *per_sample_loss(logits, targets, target_mask)

    # One pass over both probe sets (one compiled shape), split afterwards.
    probe_tokens = np.concatenate([corpus.train, corpus.held_out])
    probe_mask = np.ones_like(probe_tokens)
    probe_targets = next_token_targets(probe_tokens, probe_mask)
    n_train = len(corpus.train)
    history_dir = os.path.join(workdir, "monitor")
    monitor = PathwayMonitor({"train": corpus.train_domains, "held_out": corpus.held_out_domains},
                             directory=history_dir)
    rng = np.random.default_rng(seed)
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            intermediates, loss, correct = probe(params, probe_tokens, probe_mask, *probe_targets)
            fields = {**routing_from_flax(intermediates, probe_mask), "loss": np.asarray(loss),
                      "correct": np.asarray(correct)}  # each [train + held-out samples, ...]
            outputs = {"train": {k: v[:n_train] for k, v in fields.items()},
                       "held_out": {k: v[n_train:] for k, v in fields.items()}}
            metrics = monitor.update(step, outputs, router_matrices_from_flax(params))
            print(f"step {step}: train loss {metrics['monitor/method/train_loss']:.3f}, memorized-minus-held-out "
                  f"distance {metrics['monitor/method/contrast/distance']:.3f} (domain 'method')", flush=True)
        if step == steps:
            break
        batch = corpus.train[rng.integers(0, len(corpus.train), batch_size)]
        params, opt_state = train_step(params, opt_state, batch)
    metrics = monitor.finish()
    monitor.write_report(workdir, with_plots=with_plots)
    monitor.close()
    return {"metrics": metrics, "history_dir": history_dir, "report_dir": os.path.join(workdir, "report")}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="where the monitor's history and the report go")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--eval_every", type=int, default=30, help="steps between monitor updates")
    args = parser.parse_args()
    result = main(args.workdir, args.steps, args.eval_every)
    print(f"report: {result['report_dir']}")
