"""Memory plan of the block loop (STYLE §2.5: memory is designed in, not a flag added later).

Before the first block the pipeline estimates what one block needs on the accelerator in each
phase (FP targets, stage 1, lattice search, stage 2) and in host RAM (the two activation
caches), and picks the cheapest settings that fit the caps:

* accelerator: ``--max_gpu_memory`` (default: the device's free memory). The plan chooses the
  micro-batch (samples per forward; gradients are accumulated, so the optimisation is the same)
  and whether stage 1 recomputes the proxy weights in backward (activation checkpointing). If
  even one sample with checkpointing does not fit, the run is refused before any work with the
  estimate and the flags that change it. The cap is also handed to the CUDA allocator, so an
  estimate that was too low ends in a smaller plan (retried) rather than a larger footprint.
* host: ``--max_host_memory`` (default: half of the available RAM) decides whether the caches
  live in RAM or spill to a disk memmap (``--cache_dir``).

The estimates are deliberately simple sums over the block's linear shapes; ``report.json``
records them next to the measured peaks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from liftquant.core.lattice import ENCODE_CHUNK_ROWS, LatticeSpec
from liftquant.core.linear import lifted_width
from liftquant.core.proxy_batch import CHECKPOINT_ELEMENTS
from liftquant.core.whiten import padded_in_features
from liftquant.models.adapters import ModelAdapter
from liftquant.models.moe import ExpertList, routed_fractions

GIB = 2**30
# Activation bytes kept per token for backward, as a multiple of the block's linear inputs and
# outputs in the compute dtype (norms, attention, SwiGLU and fused-transform intermediates).
ACTIVATION_FACTOR = 3.0
# Bytes per weight element of the stage-1 proxy-weight graph (W_t, quantized, rescaled,
# rotated, ...) that autograd keeps for backward when stage 1 does not recompute it, by how the
# proxy is formed. Counted on the saved tensors (tests/test_fastloop.py): eager 48.1 (12 float32
# tensors), compiled per layer 26.1, compiled stack of same-shape layers (MoE experts) 34.1;
# each constant is the count rounded up.
PROXY_GRAPH_BYTES = {"eager": 50, "compiled": 28, "compiled_batched": 36}
# Bytes per stage-2 flip candidate: value, gradient, two Adam moments (fp32) and an int64 index.
CANDIDATE_BYTES = 24
# Share of the accelerator's free memory used when no --max_gpu_memory is given.
GPU_FREE_FRACTION = 0.92


class MemoryPlanError(ValueError):
    """The block loop cannot fit the requested memory caps."""


@dataclass
class MemoryPlan:
    micro_batch: int
    checkpoint_proxy: bool
    estimate_gib: dict[str, float]
    budget_gib: float | None
    # Stage 2 keeps a copy of the signs in the compute dtype (LiftLinear.cache_signs) instead of
    # casting the int8 signs in every forward and backward.
    cache_signs: bool = True

    def describe(self) -> str:
        est = ", ".join(f"{k} {v:.2f}" for k, v in self.estimate_gib.items())
        cap = "no cap" if self.budget_gib is None else f"cap {self.budget_gib:.2f} GiB"
        return (f"micro-batch {self.micro_batch}, stage-1 checkpointing "
                f"{'on' if self.checkpoint_proxy else 'off'}, stage-2 sign cache "
                f"{'on' if self.cache_signs else 'off'}; estimates GiB: {est} ({cap})")

    def to_dict(self) -> dict:
        return asdict(self)


def linear_shapes(block: nn.Module, adapter: ModelAdapter) -> list[tuple[int, int]]:
    """(out_features, in_features) of the block's quantized linears."""
    out = []
    for name in adapter.linear_names(block):
        lin = adapter.get_linear(block, name)
        out.append((lin.out_features, lin.in_features))
    return out


def token_shares(block: nn.Module, adapter: ModelAdapter) -> list[float]:
    """Per quantized linear (order of :func:`linear_shapes`), the share of the block's tokens
    it sees: ``top_k / experts`` inside a routed expert list (:func:`routed_fractions`), else 1."""
    lists = routed_fractions(block)
    shares = []
    for name in adapter.linear_names(block):
        owner = [f for lst, f in lists.items() if name.startswith(lst + ".")]
        shares.append(owner[0] if owner else 1.0)
    return shares


def estimate_bytes(
    shapes: list[tuple[int, int]],
    *,
    spec: LatticeSpec,
    tokens: int,
    micro_tokens: int,
    compute_bytes: int,
    weight_bytes: int,
    other_bytes: int,
    cand_fraction: float,
    checkpoint_proxy: bool,
    proxy_chunk: int = 0,
    cache_signs: bool = False,
    shares: list[float] | None = None,
    proxy_bytes: float = PROXY_GRAPH_BYTES["eager"],
) -> dict[str, int]:
    """Accelerator bytes per phase for one block (see the module docstring).

    ``shares``: per linear, the share of the tokens it sees (:func:`token_shares`; default:
    all), which scales its activation terms. ``proxy_bytes``: bytes per weight element of the
    stage-1 proxy graph (:data:`PROXY_GRAPH_BYTES`).

    ``cache_signs``: stage 2 holds every layer's signs in the compute dtype besides the int8
    ones; without it the largest layer's cast is formed in forward and again in backward.

    ``proxy_chunk``: weights whose proxy graph is recomputed at once under checkpointing when
    same-shape layers form their proxy weights batched (MoE experts,
    ``core.proxy_batch.CHECKPOINT_ELEMENTS``); 0: one layer at a time."""
    d = spec.target_dim
    n_w = sum(o * i for o, i in shapes)
    n_pad = [o * padded_in_features(i, d) for o, i in shapes]
    n_lat = [o * lifted_width(i, spec) for o, i in shapes]
    shares = [1.0] * len(shapes) if shares is None else shares
    if len(shares) != len(shapes):
        raise ValueError(f"{len(shares)} token shares for {len(shapes)} linears")
    io = sum(f * (o + i) for f, (o, i) in zip(shares, shapes, strict=True))
    weights = n_w * weight_bytes + other_bytes
    acts1 = int(ACTIVATION_FACTOR * micro_tokens * io * compute_bytes)
    ckpt_proxy = max(max(n_pad), min(proxy_chunk, sum(n_pad)))
    proxy = int((ckpt_proxy if checkpoint_proxy else sum(n_pad)) * proxy_bytes)
    stage1 = weights + n_w * compute_bytes + proxy + acts1
    rows = min(ENCODE_CHUNK_ROWS, sum(n_pad) // d)  # sub-vectors per search call
    search = weights + sum(n_pad) * 4 + sum(n_lat) + rows * spec.lifted_dim * 16
    lat_io = sum(f * (o + i + 2 * lifted_width(i, spec))
                 for f, (o, i) in zip(shares, shapes, strict=True))
    acts2 = int(ACTIVATION_FACTOR * micro_tokens * lat_io * compute_bytes)
    accum = sum(n_lat) * 4 if micro_tokens < tokens else 0  # dense latent-gradient sums
    signs = sum(n_lat) * (1 + compute_bytes) if cache_signs else sum(n_lat)
    transient = max(n_lat) * (1 if cache_signs else 2) * compute_bytes  # gw (+ the cast)
    stage2 = (other_bytes + signs + int(cand_fraction * sum(n_lat)) * CANDIDATE_BYTES
              + transient + accum + acts2)
    targets = weights + int(2 * micro_tokens * io * compute_bytes)
    return {"targets": targets, "stage1": stage1, "search": search, "stage2": stage2}


def cuda_index(device: torch.device) -> int:
    """The CUDA ordinal of ``device`` ("cuda" means the current device)."""
    return torch.cuda.current_device() if device.index is None else device.index


def gpu_budget_bytes(device: torch.device, cap_gib: float | None) -> int | None:
    """The accelerator cap in bytes (None on CPU without a cap)."""
    if cap_gib is not None:
        return int(cap_gib * GIB)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(cuda_index(device))
        return int(GPU_FREE_FRACTION * free)
    return None


def plan_block(
    block: nn.Module,
    adapter: ModelAdapter,
    spec: LatticeSpec,
    *,
    seq_len: int,
    batch_size: int,
    compute_dtype: torch.dtype,
    cand_fraction: float,
    budget_bytes: int | None,
    compiled_proxy: bool = False,
) -> MemoryPlan:
    """The largest micro-batch (checkpointing only if needed) whose every phase fits.

    ``compiled_proxy``: stage 1 forms its proxy weights through torch.compile (a smaller saved
    graph, :data:`PROXY_GRAPH_BYTES`)."""
    shapes = linear_shapes(block, adapter)
    shares = token_shares(block, adapter)
    lin_names = set(adapter.linear_names(block))
    weight_bytes = next(block.parameters()).element_size()
    other = sum(p.numel() * p.element_size() for n, p in block.named_parameters()
                if n.rsplit(".", 1)[0] not in lin_names)
    cb = torch.empty((), dtype=compute_dtype).element_size()
    batched = any(isinstance(m, ExpertList) for m in block.modules())
    chunk = CHECKPOINT_ELEMENTS if batched else 0
    form = "eager" if not compiled_proxy else "compiled_batched" if batched else "compiled"
    options = []
    mb = batch_size
    while True:  # the sign cache goes before checkpointing, both before a smaller micro-batch
        options += [(mb, False, True), (mb, False, False), (mb, True, True), (mb, True, False)]
        if mb == 1:
            break
        mb = max(1, mb // 2)
    best = None
    for mb, ckpt, cache in options:
        est = estimate_bytes(shapes, spec=spec, tokens=batch_size * seq_len,
                             micro_tokens=mb * seq_len, compute_bytes=cb,
                             weight_bytes=weight_bytes, other_bytes=other,
                             cand_fraction=cand_fraction, checkpoint_proxy=ckpt,
                             proxy_chunk=chunk, cache_signs=cache, shares=shares,
                             proxy_bytes=PROXY_GRAPH_BYTES[form])
        plan = MemoryPlan(micro_batch=mb, checkpoint_proxy=ckpt,
                          estimate_gib={k: v / GIB for k, v in est.items()},
                          budget_gib=None if budget_bytes is None else budget_bytes / GIB,
                          cache_signs=cache)
        best = plan
        if budget_bytes is None or max(est.values()) <= budget_bytes:
            return plan
    need = max(best.estimate_gib.values())
    raise MemoryPlanError(
        f"one block needs about {need:.1f} GiB of accelerator memory even with micro-batch 1 "
        f"and checkpointing, above the cap of {best.budget_gib:.1f} GiB; raise "
        f"--max_gpu_memory (or free the GPU) or lower --seqlen")


def shrink(plan: MemoryPlan) -> MemoryPlan | None:
    """The next smaller plan after an out-of-memory error (None when nothing is left)."""
    if plan.cache_signs:
        return MemoryPlan(plan.micro_batch, plan.checkpoint_proxy, plan.estimate_gib,
                          plan.budget_gib, cache_signs=False)
    if not plan.checkpoint_proxy:
        return MemoryPlan(plan.micro_batch, True, plan.estimate_gib, plan.budget_gib,
                          cache_signs=False)
    if plan.micro_batch > 1:
        return MemoryPlan(max(1, plan.micro_batch // 2), True, plan.estimate_gib,
                          plan.budget_gib, cache_signs=False)
    return None
