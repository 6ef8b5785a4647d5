"""Mixture-of-Experts blocks as per-expert linears, so that every expert matrix is quantized.

transformers 5.x stores the experts of an MoE MLP (Mixtral, Qwen3-MoE, Qwen3.5-MoE) as two fused
3-D parameters, ``experts.gate_up_proj`` (E, 2I, H: gate rows first, then up rows) and
``experts.down_proj`` (E, H, I), called as ``experts(x, top_k_index, top_k_weights)`` by the
sparse MoE block after its router. :func:`unfuse_experts` swaps each such module for
:class:`ExpertList`, an ``nn.ModuleList`` of :class:`ExpertMLP` (``gate_proj``, ``up_proj``,
``down_proj`` ``nn.Linear``) with the same call signature and the same arithmetic (the
transformers eager loop: each expert runs on the tokens routed to it, weighted, index-added).

Consequences for LiftQuant (documented rule for rarely routed experts):

* each expert's linears are one adapter group (``mlp.experts.*.gate_proj`` / ``up_proj`` share
  input, ``down_proj``), so each is a LiftQuant matrix, packed per expert;
* the input statistics (``s1`` init) of an expert come from the tokens the router sends to it,
  because the statistics hook sits on the expert's own ``gate_proj``; block-output training
  reaches an expert only through its routed tokens;
* an expert that receives **no** token among the statistics samples keeps ``s1 = 1`` and gets no
  gradient in stages 1-2: it is rounded to the lattice from its initial (data-free) transform.
  :func:`experts_without_tokens` names those experts for the block's report row;
* the router (``mlp.gate``), the shared expert's gate (``shared_expert_gate``) and every norm
  stay in full precision; a shared expert (Qwen3.5-MoE ``mlp.shared_expert``) is a plain SwiGLU
  MLP and is quantized like a dense one.

After packing, :class:`ExpertList` holds :class:`~liftquant.core.linear.PackedLiftLinear` layers: the
packed forward runs each routed expert's packed matmuls on its tokens, no dense expert weight is
rebuilt beyond what the packed layer's own backend does per call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from liftquant.core.proxy_batch import supplied_proxy_weights
from liftquant.models.adapters import set_module


class ExpertMLP(nn.Module):
    """One SwiGLU expert: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)
        self.act_fn = act_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertList(nn.ModuleList):
    """The experts of one MoE block, one :class:`ExpertMLP` per expert id; called like the
    fused transformers experts module: ``(hidden (T, H), top_k_index (T, k), top_k_weights)``.

    In stage 1 the routed experts' proxy weights are formed per shape in one batched
    computation (:func:`~liftquant.core.proxy_batch.supplied_proxy_weights`) before the
    experts run; only experts that receive tokens take part, so the others get no gradient,
    as in the per-layer path (``batch_proxy = False``, the reference)."""

    batch_proxy = True

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        n, T = len(self), top_k_index.shape[0]
        with torch.no_grad():  # one host sync for the routing (not one per expert)
            flat = top_k_index.T.reshape(-1)  # slot j = pos * T + tok
            order = torch.argsort(flat, stable=True)  # by expert, then (pos, tok) ascending
            counts = torch.bincount(flat, minlength=n + 1).tolist()
        routed = [self[e] for e in range(n) if counts[e]]  # index n: dropped tokens
        layers = [m for mlp in routed for m in mlp.modules()] if self.batch_proxy else []
        with supplied_proxy_weights(layers):
            start = 0
            for e, c in enumerate(counts):
                sel, start = order[start:start + c], start + c
                if c == 0 or e >= n:  # index n marks dropped tokens in some routers
                    continue
                pos, tok = sel // T, sel % T
                y = self[e](hidden_states[tok]) * top_k_weights[tok, pos, None]
                out.index_add_(0, tok, y.to(out.dtype))
        return out


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)
            and gate_up.ndim == 3 and down.ndim == 3)


@torch.no_grad()
def experts_from_fused(fused: nn.Module) -> ExpertList:
    """An :class:`ExpertList` with the weights of a fused experts module (meta stays meta)."""
    if any(getattr(fused, name, None) is not None for name in ("gate_up_proj_bias",
                                                               "down_proj_bias")):
        raise NotImplementedError(f"{type(fused).__name__}: experts with biases are not supported")
    gate_up, down = fused.gate_up_proj, fused.down_proj
    n, two_i, hidden = gate_up.shape
    inter = two_i // 2
    if down.shape != (n, hidden, inter):
        raise ValueError(f"{type(fused).__name__}: down_proj {tuple(down.shape)} does not match "
                         f"gate_up_proj {tuple(gate_up.shape)} (expected {(n, hidden, inter)})")
    experts = ExpertList()
    for e in range(n):
        mlp = ExpertMLP(hidden, inter, fused.act_fn, device=gate_up.device, dtype=gate_up.dtype)
        if gate_up.device.type != "meta":
            mlp.gate_proj.weight.copy_(gate_up[e, :inter])
            mlp.up_proj.weight.copy_(gate_up[e, inter:])
            mlp.down_proj.weight.copy_(down[e])
        experts.append(mlp)
    return experts


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused 3-D experts module of ``model`` by an :class:`ExpertList`, in place.

    Returns the names replaced (empty for dense models, so it is safe to call on any model).
    """
    names = [name for name, m in model.named_modules() if name and _is_fused_experts(m)]
    for name in names:
        set_module(model, name, experts_from_fused(model.get_submodule(name)))
    return names


# Attributes naming a router's experts per token (transformers' routers and MoE blocks).
TOP_K_ATTRS = ("top_k", "num_experts_per_tok")


def routed_fractions(block: nn.Module) -> dict[str, float]:
    """``{name of an ExpertList in block: top_k / number of experts}``: the share of the
    block's tokens each of its expert linears sees on average. Every token visits exactly
    ``top_k`` experts, so summed over the experts of one list the routed tokens are exactly
    ``top_k`` x tokens, however unevenly they are spread. ``top_k`` is read from the module
    holding the list or one of its direct children (``top_k`` / ``num_experts_per_tok``);
    lists whose router is not found are left out (count them as seeing every token)."""
    out = {}
    for name, module in block.named_modules():
        for child_name, child in module.named_children():
            if not isinstance(child, ExpertList) or not len(child):
                continue
            k = _top_k(module)
            if k is not None and 0 < k <= len(child):
                out[f"{name}.{child_name}" if name else child_name] = k / len(child)
    return out


def _top_k(moe: nn.Module) -> int | None:
    for m in (moe, *moe.children()):
        for attr in TOP_K_ATTRS:
            v = getattr(m, attr, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def experts_without_tokens(groups: tuple[tuple[str, ...], ...], stats: dict) -> list[str]:
    """The expert groups (``...experts.<e>...``) of a block whose first linear saw no token in
    the input statistics; they fall back to the rule in the module docstring."""
    names = [group[0].rsplit(".", 1)[0] for group in groups
             if ".experts." in f".{group[0]}" and group[0] not in stats]
    return list(dict.fromkeys(names))  # gate/up and down groups name the same expert
