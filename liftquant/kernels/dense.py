"""Dense cache of decoded weights: the CPU path for chat and evaluation of small checkpoints.

On a CPU every call of the reference decode unpacks the signs and runs ``T*`` plus a matmul
that is ``D/d`` times wider than the layer (``torch_ref``): a 135M model decodes at about one
token per second on two cores. When the dense weights ``W = dequantize_weight()`` (out x in)
fit in memory, caching them turns every packed layer into one ``F.linear``: the planner takes
the ``dense`` path for a layer that holds ``dense_weight`` on the input's device
(``policy.plan``). The weights are exactly the packed layer's function (``W x == forward(x) -
bias`` up to rounding), so logits match the packed path within the reference tolerance.

:func:`dense_cache_decision` estimates the bytes (out x in per packed layer in the cache dtype)
against the available memory times ``KernelPolicy.dense_cache_fraction``; ``dense_cache="1"``
forces it, ``"0"`` never. :func:`enable_dense_cache` applies the decision and logs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from liftquant.kernels.policy import KernelPolicy, default_policy
from liftquant.kernels.registry import is_packed
from liftquant.util.log import get_logger

logger = get_logger("kernels.dense")


def available_memory_bytes() -> int:
    """Memory the process can still take: ``MemAvailable`` of /proc/meminfo (Linux), else the
    physical memory reported by ``os.sysconf``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def packed_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_packed(m)]


def dense_cache_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the dense weights of every packed layer of ``model`` in ``dtype``."""
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(m.out_features * m.in_features * size for m in packed_layers(model))


@dataclass(frozen=True)
class DenseDecision:
    use: bool
    bytes: int
    budget: int
    reason: str


def dense_cache_decision(model: nn.Module, *, dtype: torch.dtype, device: torch.device,
                         policy: KernelPolicy | None = None,
                         available: int | None = None) -> DenseDecision:
    """Whether to cache dense weights for ``model`` on ``device``: only on the CPU (GPUs have
    the int1 kernels), when ``policy.dense_cache`` is ``"1"``, or ``"auto"`` and the bytes fit
    in ``policy.dense_cache_fraction`` of ``available`` (default: :func:`available_memory_bytes`)."""
    policy = policy if policy is not None else default_policy()
    need = dense_cache_bytes(model, dtype)
    if device.type != "cpu" or need == 0:
        return DenseDecision(False, need, 0, f"not on the CPU ({device.type}) or nothing packed")
    if policy.dense_cache == "0":
        return DenseDecision(False, need, 0, "off by policy (LIFTQUANT_DENSE_CACHE=0)")
    avail = available_memory_bytes() if available is None else int(available)
    budget = int(avail * policy.dense_cache_fraction)
    if policy.dense_cache == "1":
        return DenseDecision(True, need, budget, "forced by policy (LIFTQUANT_DENSE_CACHE=1)")
    if need <= budget:
        return DenseDecision(True, need, budget, "fits the memory budget")
    return DenseDecision(False, need, budget, "does not fit the memory budget")


@torch.no_grad()
def build_dense_cache(model: nn.Module, dtype: torch.dtype) -> int:
    """Store ``dense_weight`` (out, in) and ``dense_bias`` in ``dtype`` on every packed layer
    (their own device); returns the count. The checkpoint is unchanged (plain attributes)."""
    layers = packed_layers(model)
    for m in layers:
        m.dense_weight = m.dequantize_weight().to(dtype).contiguous()
        m.dense_bias = None if m.bias is None else m.bias.to(dtype)
    return len(layers)


def drop_dense_cache(model: nn.Module) -> None:
    for m in packed_layers(model):
        m.dense_weight = m.dense_bias = None


def enable_dense_cache(model: nn.Module, *, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None,
                       policy: KernelPolicy | None = None,
                       available: int | None = None) -> DenseDecision:
    """Decide (:func:`dense_cache_decision`), build the cache if chosen, log the decision.

    ``dtype`` defaults to the model's first floating parameter dtype (the activation dtype);
    ``device`` to the device of the first packed layer.
    """
    layers = packed_layers(model)
    if not layers:
        return DenseDecision(False, 0, 0, "nothing packed")
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                     torch.float32)
    device = torch.device(device) if device is not None else layers[0].packed_signs.device
    decision = dense_cache_decision(model, dtype=dtype, device=device, policy=policy,
                                    available=available)
    if decision.use:
        build_dense_cache(model, dtype)
    if device.type == "cpu":
        logger.info("dense weight cache %s: %.2f GiB of %s weights, budget %.2f GiB (%s)",
                    "on" if decision.use else "off", decision.bytes / 2**30, dtype,
                    decision.budget / 2**30, decision.reason)
    return decision
