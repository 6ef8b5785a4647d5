"""Sibling packed layers that read the same input (q/k/v, gate/up) as one T* and one GEMV launch.

At batch 1 each packed linear costs two kernel launches (``fused_transform`` then the GEMV),
and on an H100 both are latency bound (``bench/kernels/README.md``). A :class:`PackedGroup` keeps each
member's own transform and codes (no quantization change) but runs them together:

* the members' side tensors are stacked, ``s1`` (M, n), ``L`` (M, n1, n1), ``R`` (M, n2, C),
  ``s2_act`` (M, n1, NB, 1), and one ``fused_transform`` launch writes every member's pair-layout
  activations;
* their packed codes, scales and biases are concatenated along rows, and one
  ``int1_gemv_group`` launch (split-K, ``gemv_splitk``) reads each member's rows against that
  member's activations.

The members' buffers become views of the stacked and concatenated tensors, so grouping copies
nothing for good and the members still work one by one (the HF forward, other backends,
prefill). Grouping needs the same input width, lattice, block shape, side dtype, device and
bias presence; :func:`sibling_groups` groups what qualifies among a block's linear groups (the
model adapter's) and leaves the rest alone. Whether a call runs grouped is the planner's
decision for the first member (``kernels.policy.plan``), with every member's packed bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from liftquant.kernels.policy import Plan
from liftquant.kernels.registry import is_packed, layer_backend, plan_of

_SIDE = ("s1", "L", "R", "s2_act")


def groupable(layers: list[nn.Module]) -> str | None:
    """Why ``layers`` cannot form a group, or None when they can."""
    if not 2 <= len(layers) <= 3:
        return f"a group has 2 or 3 members, not {len(layers)}"
    if not all(is_packed(m) for m in layers):
        return "not every member is a PackedLiftLinear"
    first = layers[0]

    def sig(m: nn.Module) -> tuple:
        return (m.in_features, m.spec.name, m.block_shape, m.lifted_width, m.s1.dtype,
                m.packed_signs.device, m.bias is None, m.backend,
                getattr(m, "kernel_policy", None))

    if any(sig(m) != sig(first) for m in layers[1:]):
        return ("members differ in input width, lattice, block shape, side dtype, device, "
                "bias or backend")
    if first.packed_signs.device.type == "meta":
        return "members are on the meta device"
    return None


class PackedGroup(nn.Module):
    """``M`` packed layers with one input, run as one transform and one GEMV at batch 1.

    ``group(x)`` returns the members' outputs as a tuple. Construction re-points every
    member's buffers at views of the group's stacked tensors (the old storage is freed).
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        reason = groupable(layers)
        if reason is not None:
            raise ValueError(f"cannot group these layers: {reason}")
        self.members = tuple(m.out_features for m in layers)
        self.layers = list(layers)  # plain list: the members stay owned by their parents
        self.spec = layers[0].spec
        with torch.no_grad():
            for name in _SIDE:
                stacked = torch.stack([getattr(m, name) for m in layers]).contiguous()
                self.register_buffer(name, stacked, persistent=False)
                for i, m in enumerate(layers):
                    setattr(m, name, stacked[i])
            for name in ("packed_signs", "scale", "bias"):
                if getattr(layers[0], name) is None:
                    self.register_buffer(name, None, persistent=False)
                    continue
                cat = torch.cat([getattr(m, name) for m in layers]).contiguous()
                self.register_buffer(name, cat, persistent=False)
                for m, part in zip(layers, cat.split(self.members)):
                    setattr(m, name, part)

    def plan_for(self, x: Tensor) -> Plan:
        """The planner's path for the group on ``x`` (the first member's shape, every member's
        packed bytes)."""
        return plan_of(self.layers[0], x, packed_bytes=self.packed_signs.numel())

    def fused_call(self, x: Tensor) -> bool:
        """Whether ``x`` runs through the grouped Triton kernels (else member by member)."""
        return self.plan_for(x).path in ("fused_small", "gemv")

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        p = self.plan_for(x)
        if p.path not in ("fused_small", "gemv"):
            return tuple(m(x) for m in self.layers)
        d, D = self.spec.target_dim, self.spec.lifted_dim
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        side = (self.s1, self.L, self.R, self.s2_act)
        ops = torch.ops.liftquant
        if p.path == "fused_small":
            out = ops.fused_small_linear(x2, *side, self.packed_signs, self.scale, self.bias,
                                         d, D, list(self.members), p.pdl)
        else:
            xp, wsc = ops.fused_transform(x2, *side, d, D, True, p.pdl, p.pdl_early)
            out = ops.int1_gemv_group(xp, wsc, self.packed_signs, self.scale, self.bias,
                                      x.dtype, list(self.members), self._tuner_id(x), p.pdl)
        return tuple(o.reshape(*lead, o.shape[-1]) for o in out.split(self.members, dim=-1))

    def _tuner_id(self, x: Tensor) -> int:
        return layer_backend(self.layers[0], x.device).tuner_id

    def add_norm_forward(self, h: Tensor, delta: Tensor, weight: Tensor,
                         eps: float) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``add_rms_norm(h, delta, weight, eps)`` then the group, in two launches (the norm
        runs inside T*, :func:`takes_prologue`): (new residual, the members' outputs)."""
        d, D = self.spec.target_dim, self.spec.lifted_dim
        n = h.shape[-1]
        p = self.plan_for(h)
        xp, wsc, h_new = torch.ops.liftquant.fused_norm_transform(
            h.reshape(-1, n), delta.reshape(-1, n), weight, eps, self.s1, self.L, self.R,
            self.s2_act, d, D, p.pdl, p.pdl_early)
        out = torch.ops.liftquant.int1_gemv_group(xp, wsc, self.packed_signs, self.scale,
                                                  self.bias, h.dtype, list(self.members),
                                                  self._tuner_id(h), p.pdl)
        lead = h.shape[:-1]
        return h_new.view(h.shape), tuple(o.reshape(*lead, o.shape[-1])
                                          for o in out.split(self.members, dim=-1))

    def extra_repr(self) -> str:
        return f"members={self.members}, lattice={self.spec.name}"


def takes_prologue(layer: nn.Module, x: Tensor) -> bool:
    """Whether the decode step may compute ``layer``'s input inside its T* launch (residual
    add + RMSNorm, or the SiLU gate): the planner chose the two-kernel decode path (not the
    one-launch small path, which takes a finished input) with prologues on."""
    return is_packed(layer) and plan_of(layer, x).prologue


def silu_linear(layer: nn.Module, gate: Tensor, up: Tensor) -> Tensor:
    """``layer(silu(gate) * up)`` in two launches (the SiLU gate runs inside T*)."""
    d, D = layer.spec.target_dim, layer.spec.lifted_dim
    n = gate.shape[-1]
    backend = layer_backend(layer, gate.device)
    p = backend.plan_for(layer, gate)
    xp, wsc = torch.ops.liftquant.fused_silu_transform(
        gate.reshape(-1, n), up.reshape(-1, n), layer.s1, layer.L, layer.R, layer.s2_act, d, D,
        p.pdl, p.pdl_early)
    out = torch.ops.liftquant.int1_gemv(xp, wsc, layer.packed_signs, layer.scale, layer.bias,
                                        gate.dtype, backend.tuner_id, p.pdl)
    return out.reshape(*gate.shape[:-1], out.shape[-1])


def sibling_groups(block: nn.Module,
                   paths: tuple[tuple[str, ...], ...]) -> dict[tuple, PackedGroup]:
    """The groups of ``block`` built from ``paths`` (the adapter's linear groups with 2 or 3
    members, e.g. q/k/v and gate/up) where the members qualify (:func:`groupable`), keyed by
    their paths."""
    groups = {}
    for names in paths:
        if not 2 <= len(names) <= 3:
            continue
        try:
            mods = [block.get_submodule(p) for p in names]
        except AttributeError:
            continue
        if groupable(mods) is None:
            groups[tuple(names)] = PackedGroup(mods)
    return groups
