"""Stage-1 proxy weights of many same-shape :class:`LiftLinear` layers in one computation.

An MoE block has hundreds of expert linears of a few shapes (gate/up and down per expert).
Formed one by one, their proxy weights ``T^-1(Q(W T))`` cost a few kernels and two small
Cayley solves each, and a stage-1 step is dominated by that per-layer overhead. Here the
layers of one shape are stacked on a leading layer dim ``E``: their ``P1_skew``/``P2_skew``,
``s1``/``s2`` and clip parameters are ``torch.stack``-ed (differentiable, so every layer's own
parameters get their gradients), the Cayley factors come from one batched solve, the
rotations are batched matmuls and the proxy quantizer runs once on the stack.

:func:`batched_proxy_weights` equals ``[layer.proxy_weight() for layer in layers]`` (values
and gradients, to float32 rounding) and follows the layers' ``checkpoint_proxy`` (the stack is
recomputed in backward, in chunks of at most ``CHECKPOINT_ELEMENTS`` weights) and
``compile_proxy`` (one ``torch.compile`` graph of :func:`stacked_proxy_weight`, dynamic in
``E``). :func:`supplied_proxy_weights` hands the results to the layers' forwards for the
duration of one call (``LiftLinear.step_weight``); :class:`~liftquant.models.moe.ExpertList`
uses it for the experts routed to in that call. ``LiftLinear.proxy_weight`` stays the
per-layer reference.

Legend: ``E`` layers in the stack, ``out``/``n`` their rows/in_features, ``(n1, n2)`` the
block shape, ``n_pad = n1 n2``, ``d`` the target dim.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from liftquant.core.linear import LiftLinear
from liftquant.core.proxy import UniformProxy, uniform_proxy
from liftquant.core.whiten import KronWhitening, cayley

# With checkpoint_proxy, weights (out x n_pad elements) per checkpointed chunk of a stack: the
# recomputed graph in backward holds a few float32 tensors of this size (quantize.plan counts
# it). At least one layer per chunk.
CHECKPOINT_ELEMENTS = 2**24

_COMPILED = None


def batch_key(layer) -> tuple | None:
    """Layers with equal keys can share one stacked proxy weight; None: not batchable (not a
    stage-1 :class:`LiftLinear` with the stock whitening and proxy quantizer)."""
    if type(layer) is not LiftLinear or layer.mode != "proxy":
        return None
    w, p = layer.whiten, layer.proxy
    if type(w) is not KronWhitening or type(p) is not UniformProxy:
        return None
    return (layer.out_features, layer.in_features, w.n1, w.n2, w.d, p.bits, layer.weight.dtype,
            w.s1.dtype, layer.weight.device, layer.checkpoint_proxy, layer.compile_proxy)


def batch_groups(layers: Iterable) -> list[list[LiftLinear]]:
    """The batchable ``layers`` grouped by :func:`batch_key` (groups of two or more, in first
    appearance order); the rest keep the per-layer path."""
    groups: dict[tuple, list[LiftLinear]] = {}
    for layer in layers:
        key = batch_key(layer)
        if key is not None:
            groups.setdefault(key, []).append(layer)
    return [g for g in groups.values() if len(g) > 1]


def _rotate(X: Tensor, P1: Tensor, P2: Tensor) -> Tensor:
    """``P1^T X P2`` for every (layer, row): X (E, out, n1, n2), P1 (E, n1, n1), P2 (E, n2, n2).

    The left factor is one batched matmul over the layer dim (einsum folds the rows into the
    columns), not a broadcast that would copy P1 once per row."""
    E, out, n1, n2 = X.shape
    X = torch.einsum("eki,eokj->eoij", P1, X)
    return (X.reshape(E, out * n1, n2) @ P2).reshape(E, out, n1, n2)


def stacked_proxy_weight(W: Tensor, s1: Tensor, s2: Tensor, P1_init: Tensor, P1_skew: Tensor,
                         P2_init: Tensor, P2_skew: Tensor, clip: Tensor, *, d: int,
                         bits: int) -> Tensor:
    """``T_e^-1(Q_e(W_e T_e))`` for a stack of layers: (E, out, n) float32.

    ``W`` (E, out, n) frozen weights, ``s1`` (E, n), ``s2`` (E, n1, n2 / d), ``P*_init`` and
    ``P*_skew`` (E, k, k), ``clip`` (E, out). The arithmetic of ``LiftLinear.proxy_weight``
    (``KronWhitening.forward_weight``, ``UniformProxy``, ``inverse_weight``) with a layer dim.
    """
    E, out, n = W.shape
    n1, n2 = P1_init.shape[-1], P2_init.shape[-1]
    n_pad = n1 * n2
    P1, P2 = cayley(P1_init, P1_skew), cayley(P2_init, P2_skew)
    s1p = F.pad(s1, (0, n_pad - n), value=1.0)[:, None, :]  # (E, 1, n_pad)
    s2c = s2[:, None, :, :, None]  # (E, 1, n1, n2 / d, 1)
    X = F.pad(W.float(), (0, n_pad - n)) * s1p
    X = _rotate(X.reshape(E, out, n1, n2), P1, P2)
    W_t = (X.reshape(E, out, n1, n2 // d, d) * s2c).reshape(E, out, n_pad)
    Q = uniform_proxy(W_t, clip, bits)
    X = (Q.reshape(E, out, n1, n2 // d, d) / s2c).reshape(E, out, n1, n2)
    X = _rotate(X, P1.mT, P2.mT).reshape(E, out, n_pad)
    return (X / s1p)[..., :n]


def _compiled_stacked():
    """:func:`stacked_proxy_weight` under ``torch.compile`` (dynamic shapes: the number of
    routed experts changes from step to step), built once per process."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(stacked_proxy_weight, dynamic=True)
    return _COMPILED


def _stack(layers: list[LiftLinear], *, compiled: bool) -> Tensor:
    w0, p0 = layers[0].whiten, layers[0].proxy
    fn = _compiled_stacked() if compiled else stacked_proxy_weight
    whitens = [layer.whiten for layer in layers]
    with torch.autocast(layers[0].weight.device.type, enabled=False):
        return fn(torch.stack([layer.weight for layer in layers]),
                  torch.stack([w.s1 for w in whitens]), torch.stack([w.s2 for w in whitens]),
                  torch.stack([w.P1_init for w in whitens]),
                  torch.stack([w.P1_skew for w in whitens]),
                  torch.stack([w.P2_init for w in whitens]),
                  torch.stack([w.P2_skew for w in whitens]),
                  torch.stack([layer.proxy.clip for layer in layers]), d=w0.d, bits=p0.bits)


def batched_proxy_weights(layers: list[LiftLinear]) -> list[Tensor]:
    """``[layer.proxy_weight() for layer in layers]`` as one stacked computation.

    All layers must share one :func:`batch_key`. ``checkpoint_proxy`` (with grad enabled):
    the stack is recomputed in backward, in chunks of at most ``CHECKPOINT_ELEMENTS``
    weights; ``compile_proxy`` (with grad enabled): through one compiled graph.
    """
    keys = {batch_key(layer) for layer in layers}
    if not layers or None in keys or len(keys) > 1:
        raise ValueError("batched_proxy_weights needs stage-1 LiftLinears of one shape and "
                         "one setting (core.proxy_batch.batch_key)")
    lead = layers[0]
    compiled = lead.compile_proxy and torch.is_grad_enabled()  # no_grad: eager (linear.py)
    if not (lead.checkpoint_proxy and torch.is_grad_enabled()):
        return list(_stack(layers, compiled=compiled).unbind(0))
    per = max(1, CHECKPOINT_ELEMENTS // (lead.out_features * lead.whiten.padded_in_features))
    out = []
    for i in range(0, len(layers), per):
        chunk = checkpoint(_stack, layers[i:i + per], compiled=compiled, use_reentrant=False)
        out += chunk.unbind(0)
    return out


@contextmanager
def supplied_proxy_weights(layers: Iterable) -> Iterator[list[LiftLinear]]:
    """For the body of the ``with``: every batchable group of ``layers`` (:func:`batch_groups`)
    forms its proxy weights in one :func:`batched_proxy_weights` and each layer's forward uses
    its own (``LiftLinear.step_weight``); cleared on exit. Yields the layers supplied."""
    supplied: list[LiftLinear] = []
    try:
        for group in batch_groups(layers):
            for layer, w in zip(group, batched_proxy_weights(group), strict=True):
                layer.step_weight = w
                supplied.append(layer)
        yield supplied
    finally:
        for layer in supplied:
            layer.step_weight = None
