"""Routing statistics of a user's own Flax MoE model, for `PathwayMonitor`: a convention and its adapter.

The convention (docs/integrations.md):

1. Each MoE layer sows its router output for every token once per call, into the collection
   ``"intermediates"`` (`ROUTING_COLLECTION`), under the name ``"router_logits"`` (raw logits,
   ``[batch, seq, experts]``; the softmax over all experts is taken here) or ``"router_probs"``
   (the router's softmax over ALL experts, not renormalized top-k weights)::

       logits = self.router(x)                                   # [batch, seq, experts]
       self.sow("intermediates", "router_logits", logits)

   and the model is applied with ``mutable=["intermediates"]``; the returned collection is what
   `routing_from_flax` reads. Layers stacked by ``nn.scan`` (``variable_axes={"intermediates": 0}``)
   sow one leaf ``[layers, batch, seq, experts]``; that is read as that many layers in order.
2. Layer order is the order of the sown leaves' paths with every number compared as a number
   ("layers_2" before "layers_10"; a plain dict sort, as JAX's tree functions do, would put
   "layers_10" first). Name layers so that this order is the model's (Flax's default names
   ``layers_0``, ``layers_1``, ... are), or pass the paths in order as ``layer_paths``.
3. The router of each MoE layer is a bias-free ``nn.Dense(num_experts, name="router")`` (kernel
   ``[hidden, experts]``): `router_matrices_from_flax` stacks the kernels in the same order as
   ``[L, E, D]``, the router matrices pathway consistency needs. A router of another name: pass it.

Only MoE layers sow, so L counts the MoE layers.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from moe_grok.monitor.routing_arrays import summarize_routing, to_numpy

ROUTING_COLLECTION = "intermediates"
"""The Flax collection MoE layers sow their router output into."""
LOGITS_NAME = "router_logits"
"""The sown name of raw router logits ``[batch, seq, experts]``."""
PROBS_NAME = "router_probs"
"""The sown name of router probabilities ``[batch, seq, experts]`` (softmax over all experts)."""
ROUTER_NAME = "router"
"""The name of each MoE layer's bias-free router ``nn.Dense`` (kernel ``[hidden, experts]``)."""


def natural_key(path: Sequence[str]) -> tuple:
    """A sort key for a path of names that compares the numbers inside names as numbers:
    ("layers_2", "moe") before ("layers_10", "moe")."""
    return tuple(tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))
                 for name in path)


def _leaves(tree: Mapping, name: str, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """path (module names, the leaf name excluded) -> value of every entry called `name` in a nested mapping."""
    found = {}
    for key, value in tree.items():
        if key == name and not isinstance(value, Mapping):
            found[prefix] = value
        elif isinstance(value, Mapping):
            found.update(_leaves(value, name, (*prefix, str(key))))
    return found


def _ordered(found: dict[tuple[str, ...], object], layer_paths: Sequence[str] | None, what: str) -> list:
    """The values of `found` in layer order: `layer_paths` ("layers_0/moe") when given, else natural path order."""
    if layer_paths is None:
        return [found[path] for path in sorted(found, key=natural_key)]
    by_text = {"/".join(path): value for path, value in found.items()}
    missing = [path for path in layer_paths if path not in by_text]
    extra = sorted(set(by_text) - set(layer_paths))
    if missing or extra:
        raise ValueError(f"layer_paths must name every {what} exactly once; not found: {missing}, not named: {extra} "
                         f"(found: {sorted(by_text, key=lambda p: natural_key(p.split('/')))})")
    return [by_text[path] for path in layer_paths]


def _sown_value(path: tuple[str, ...], value) -> np.ndarray:
    """The one array a layer sowed (Flax keeps a tuple of every value sown under a name)."""
    if isinstance(value, tuple | list):
        if len(value) != 1:
            raise ValueError(f"{'/'.join(path)} sowed {len(value)} values: apply the model once per batch with a "
                             "fresh mutable=['intermediates'] collection (one value per layer and call)")
        value = value[0]
    return to_numpy(value)


def routing_from_flax(intermediates: Mapping, mask, *, scored_mask=None,
                      layer_paths: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per-sample routing of one batch from the router outputs a Flax MoE sowed (module docstring).

    intermediates: the ``"intermediates"`` collection returned by ``model.apply(..., mutable=
    ["intermediates"])`` (or the whole mutated-variables dict holding it). mask: ``[batch, seq]``
    1 = real token; scored_mask: ``[batch, seq]`` 1 = scored position, optional. layer_paths: the
    sown layers' module paths ("layers_0/moe") in layer order, to override the natural order.

    Returns `hf_routing.routing_from_hf`'s dict: "mean_weights" [batch, L, E], "routing_entropy"
    [batch, L] (nats), with scored_mask "scored_mean_weights" / "scored_routing_entropy"; float32.
    """
    if ROUTING_COLLECTION in intermediates and isinstance(intermediates[ROUTING_COLLECTION], Mapping):
        intermediates = intermediates[ROUTING_COLLECTION]
    logits, probs = _leaves(intermediates, LOGITS_NAME), _leaves(intermediates, PROBS_NAME)
    if logits and probs:
        raise ValueError(f"the model sows both {LOGITS_NAME!r} and {PROBS_NAME!r}: sow one of them per MoE layer")
    if not logits and not probs:
        raise ValueError(f"nothing sown as {LOGITS_NAME!r} or {PROBS_NAME!r} in the intermediates (top-level keys "
                         f"{list(intermediates)[:8]}): each MoE layer must call self.sow({ROUTING_COLLECTION!r}, "
                         f"{LOGITS_NAME!r}, logits) and the model be applied with mutable=[{ROUTING_COLLECTION!r}]")
    found = {path: _sown_value(path, value) for path, value in (logits or probs).items()}
    layers = []
    for value in _ordered(found, layer_paths, "sown router output"):
        if value.ndim == 4:  # nn.scan over layers: [layers, batch, seq, experts]
            layers.extend(value)
        elif value.ndim == 3:
            layers.append(value)
        else:
            raise ValueError(f"a sown router output must be [batch, seq, experts] (or [layers, batch, seq, "
                             f"experts] under nn.scan), got shape {value.shape}")
    mask = to_numpy(mask, np.int32)
    shapes = {layer.shape for layer in layers}
    if len(shapes) != 1 or next(iter(shapes))[:2] != mask.shape:
        raise ValueError(f"the sown router outputs must all be [batch, seq, experts] with [batch, seq] = mask's "
                         f"{mask.shape}; got {sorted(shapes)}")
    return summarize_routing(np.stack(layers, axis=2), mask, scored_mask, probs=bool(probs))  # [B, S, L, E]


def router_matrices_from_flax(params: Mapping, router_name: str = ROUTER_NAME,
                              layer_paths: Sequence[str] | None = None) -> np.ndarray:
    """Router matrices ``[L, E, D]`` float32 of a Flax MoE: the kernel ``[D, E]`` of every module named
    `router_name`, transposed, in layer order (natural path order, or `layer_paths`: the routers'
    module paths, e.g. "layers_0/moe/router"). params: the "params" collection or the variables holding it."""
    if "params" in params and isinstance(params["params"], Mapping):
        params = params["params"]
    routers = {path: value for path, value in _leaves(params, "kernel").items() if path and path[-1] == router_name}
    if not routers:
        raise ValueError(f"no module named {router_name!r} with a kernel in params: name each MoE layer's router "
                         f"nn.Dense(num_experts, use_bias=False, name={router_name!r}) or pass router_name")
    kernels = []
    for kernel in _ordered({path: to_numpy(v) for path, v in routers.items()}, layer_paths, "router"):
        if kernel.ndim == 3:  # nn.scan over layers: [layers, hidden, experts]
            kernels.extend(kernel)
        elif kernel.ndim == 2:
            kernels.append(kernel)
        else:
            raise ValueError(f"a router kernel must be [hidden, experts] (or [layers, hidden, experts] under "
                             f"nn.scan), got shape {kernel.shape}")
    if len({k.shape for k in kernels}) != 1:
        raise ValueError(f"router kernels differ in shape: {sorted({k.shape for k in kernels})}")
    return np.stack([k.T for k in kernels])
