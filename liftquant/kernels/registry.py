"""Kernel backends for ``PackedLiftLinear``, chosen by name or by capability (STYLE 2.1.6-7).

Backends (each exposes ``linear(layer, x) -> Tensor`` and ``plan_for(layer, x) -> Plan``):

* ``torch``: unpack -> matmul (``torch_ref``); always available, the numerical oracle;
* ``triton``: fused ``T*`` transform + int1 GEMV (decode; split-K row stream or row tile,
  chosen per shape by its ``gemv_tuner.GemvTuner``; the smallest layers in one launch,
  ``fused_small``) / GEMM (batches) (``triton_int1``); CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1``;
* ``bitblas``: BitBLAS int1 matmul (``bitblas_backend``), imported lazily. BitBLAS 0.1.x links
  the CUDA 12 runtime and fails to build its kernels on Hopper with CUDA 13; asking for it then
  warns once with the reason and falls back to ``auto``.

A backend *instance* is built per (name, :class:`~liftquant.kernels.policy.KernelPolicy`) and
owns that policy, its kernel cache, and (Triton) its GEMV tuner and split-K workspaces; every
call asks the planner (``policy.plan``) for the path and passes its decisions to the custom ops.
Two policies (benchmark A/B) are two instances: ``get_backend("triton", dev, policy=p)``.
Any backend takes the ``dense`` path for a layer holding a dense weight cache on the input's
device (``kernels.dense``).

``get_backend("auto", device)`` picks ``triton`` on CUDA when Triton imports, else ``torch``.
``set_backend(model, name, policy=None)`` sets the ``backend`` (and ``kernel_policy``)
attributes of every packed layer; the layer's ``forward`` resolves them per call (dictionary
lookups once resolved). This package never imports ``liftquant.linear``: packed layers are
recognised by their buffers (:func:`is_packed`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liftquant.kernels.cache import KernelCache
from liftquant.kernels.policy import KernelPolicy, LayerShape, Plan, Target, default_policy, plan
from liftquant.util.log import get_logger

logger = get_logger("kernels")

AUTO = "auto"
__all__ = ["AUTO", "Backend", "KernelCache", "TorchBackend", "TritonBackend", "backend_names",
           "get_backend", "is_packed", "register_backend", "set_backend"]


def _torch_backend(policy: KernelPolicy) -> Backend:
    return TorchBackend(policy)


def _triton_backend(policy: KernelPolicy) -> Backend:
    return TritonBackend(policy)


def _bitblas_backend(policy: KernelPolicy) -> Backend:
    from liftquant.kernels.bitblas_backend import BitblasBackend  # bitblas itself stays lazy

    return BitblasBackend(policy)


# name -> factory(policy). Factories import on first use, so importing this module never
# imports Triton or BitBLAS; plain import statements (no importlib) keep them traceable.
_BACKENDS: dict[str, Callable[[KernelPolicy], Backend]] = {
    "torch": _torch_backend,
    "triton": _triton_backend,
    "bitblas": _bitblas_backend,
}


class Backend(Protocol):
    name: str
    policy: KernelPolicy

    def linear(self, layer: nn.Module, x: Tensor) -> Tensor: ...


def is_packed(module: nn.Module) -> bool:
    """Whether ``module`` is a packed LiftQuant layer (``PackedLiftLinear``'s buffers)."""
    return (getattr(module, "packed_signs", None) is not None
            and hasattr(module, "lifted_width") and hasattr(module, "fused_input"))


class _State:
    """Backend instances per (name, policy), resolved (name, policy, device) triples and the
    warn-once record."""

    def __init__(self) -> None:
        self.instances: dict[tuple[str, KernelPolicy], Backend] = {}
        self.resolved: dict[tuple, Backend] = {}
        self.warned: set[str] = set()


_STATE = _State()


def reset() -> None:
    """Forget resolved backends and issued warnings (tests)."""
    global _STATE
    _STATE = _State()


def register_backend(name: str, factory: Callable[[KernelPolicy], Backend]) -> None:
    """Register a backend factory under ``name``: called once per policy, on first use, with
    that policy. A class may define ``unavailable_reason(device, policy)``."""
    _BACKENDS[name.lower()] = factory
    reset()


def backend_names() -> list[str]:
    return [AUTO, *sorted(_BACKENDS)]


def warn_once(key: str, message: str) -> None:
    if key not in _STATE.warned:
        _STATE.warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        logger.warning(message)


def _instance(name: str, policy: KernelPolicy) -> Backend:
    backend = _STATE.instances.get((name, policy))
    if backend is None:
        backend = _STATE.instances[(name, policy)] = _BACKENDS[name](policy)
    return backend


def _check_name(name: str) -> str:
    key = str(name).lower()
    if key != AUTO and key not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose from {', '.join(backend_names())}")
    return key


def _resolve(name: str, device: torch.device, policy: KernelPolicy) -> Backend:
    if name == AUTO:  # the interpreter is for tests: auto never picks Triton on CPU
        use_triton = (device.type == "cuda"
                      and TritonBackend.unavailable_reason(device, policy) is None)
        return _instance("triton" if use_triton else "torch", policy)
    cls_reason = getattr(type(_instance(name, policy)), "unavailable_reason", None)
    reason = cls_reason(device, policy) if cls_reason is not None else None
    if reason is None:
        return _instance(name, policy)
    fallback = _resolve(AUTO, device, policy)
    warn_once(f"{name}:{device.type}", f"liftquant: kernel backend {name!r} is unavailable "
              f"on {device.type} ({reason}); falling back to {fallback.name!r}")
    return fallback


def get_backend(name: str = AUTO, device: torch.device | str | None = None, *,
                policy: KernelPolicy | None = None) -> Backend:
    """The backend called ``name`` for ``device`` (default: CUDA if available, else CPU) under
    ``policy`` (default: the process policy, ``policy.default_policy``).

    Unknown names raise ``ValueError`` listing the registered ones; a known but unavailable
    backend warns once and falls back to ``auto``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    policy = policy if policy is not None else default_policy()
    key = (str(name).lower(), policy, device.type, device.index)
    backend = _STATE.resolved.get(key)
    if backend is None:
        backend = _STATE.resolved[key] = _resolve(_check_name(name), device, policy)
    return backend


def set_backend(model: nn.Module, name: str, *, policy: KernelPolicy | None = None) -> int:
    """Set ``backend = name`` (and ``kernel_policy = policy``; None: the process policy) on
    every packed layer in ``model``; returns the count."""
    name = _check_name(name)
    layers = [m for m in model.modules() if is_packed(m)]
    for layer in layers:
        layer.backend = name
        layer.kernel_policy = policy
    for device in {layer.packed_signs.device for layer in layers}:
        if device.type != "meta":
            get_backend(name, device, policy=policy)  # resolve (and warn) now, not in a trace
    return len(layers)


def layer_backend(layer: nn.Module, device: torch.device) -> Backend:
    """The backend instance that runs ``layer`` on ``device`` (its name and policy)."""
    return get_backend(layer.backend, device, policy=getattr(layer, "kernel_policy", None))


def plan_of(layer: nn.Module, x: Tensor, *, packed_bytes: int | None = None) -> Plan:
    """The planner's path for ``layer`` on ``x`` under its backend and policy; backends
    without a planner (BitBLAS, registered ones) run whole layers: ``Plan("torch")``."""
    backend = layer_backend(layer, x.device)
    planner = getattr(backend, "plan_for", None)
    return Plan("torch") if planner is None else planner(layer, x, packed_bytes=packed_bytes)


def dense_weight(layer: nn.Module, device: torch.device) -> Tensor | None:
    """The layer's dense weight cache if it lives on ``device`` (``kernels.dense``)."""
    w = getattr(layer, "dense_weight", None)
    return w if w is not None and w.device == device else None


class _PlannedBackend:
    """Shared by the backends: the planner's decision per call, cached per problem."""

    name = "base"
    triton = False

    def __init__(self, policy: KernelPolicy | None = None) -> None:
        self.policy = policy if policy is not None else default_policy()
        self.cache = KernelCache(self.name)
        self._plans: dict[tuple, Plan] = {}
        self._targets: dict[str, Target] = {}

    def target(self, device: torch.device) -> Target:
        key = str(device)
        t = self._targets.get(key)
        if t is None:
            cap = 0
            if device.type == "cuda":
                index = device.index if device.index is not None else torch.cuda.current_device()
                cap = torch.cuda.get_device_capability(index)[0]
            t = self._targets[key] = Target(device.type, cap, self.triton)
        return t

    def plan_for(self, layer: nn.Module, x: Tensor, *, packed_bytes: int | None = None) -> Plan:
        """The planner's path for ``layer`` on ``x`` (a group passes its members' bytes)."""
        batch = x.numel() // x.shape[-1] if x.dim() else 1
        grad = x.requires_grad and torch.is_grad_enabled()
        dense = dense_weight(layer, x.device) is not None
        nbytes = layer.packed_signs.numel() if packed_bytes is None else packed_bytes
        key = (layer.in_features, layer.out_features, layer.lifted_width, nbytes, batch,
               x.dtype, str(x.device), grad, dense)
        p = self._plans.get(key)
        if p is None:
            p = self._plans[key] = plan(LayerShape.of(layer, nbytes), batch, x.dtype,
                                        self.policy, target=self.target(x.device),
                                        backend=self.name, grad=grad, dense=dense)
        return p

    def linear(self, layer: nn.Module, x: Tensor) -> Tensor:
        return self.run(self.plan_for(layer, x), layer, x)

    def run(self, p: Plan, layer: nn.Module, x: Tensor) -> Tensor:
        from liftquant.kernels import torch_ref

        if p.path == "dense":
            w = layer.dense_weight
            out = F.linear(x.to(w.dtype), w, getattr(layer, "dense_bias", None))
            return out.to(x.dtype)
        return torch_ref.linear(layer, x)


class TorchBackend(_PlannedBackend):
    """Always available; unpack -> matmul (or the dense cache)."""

    name = "torch"

    @staticmethod
    def unavailable_reason(device: torch.device, policy: KernelPolicy | None = None) -> str | None:
        return None


class TritonBackend(_PlannedBackend):
    """Fused T* + int1 GEMV for decode, T* + unpack-to-tile GEMM for batches; owns its GEMV
    tuner (kind and tuning from the policy) and split-K workspaces."""

    name = "triton"
    triton = True

    def __init__(self, policy: KernelPolicy | None = None) -> None:
        super().__init__(policy)
        from liftquant.kernels import (  # noqa: F401 - registers the ops
            fused_small,
            gemm_small,
            gemv_lut,
            triton_int1,
        )
        from liftquant.kernels.gemv_splitk import Workspaces
        from liftquant.kernels.gemv_tuner import GemvTuner, register_tuner

        self.workspaces = Workspaces()
        kind = "auto" if self.policy.gemv_kind == "lut" else self.policy.gemv_kind
        self.tuner = GemvTuner(kind=kind, tune=self.policy.tune, workspaces=self.workspaces)
        self.tuner_id = register_tuner(self.tuner)
        self.cache = self.tuner.cache  # tuned GEMV configurations keyed by shape

    @staticmethod
    def unavailable_reason(device: torch.device, policy: KernelPolicy | None = None) -> str | None:
        from liftquant.kernels import int1_words

        policy = policy if policy is not None else default_policy()
        if not int1_words.HAS_TRITON:
            return "Triton is not importable"
        if device.type == "cuda" or (device.type == "cpu" and policy.interpret):
            return None
        return "Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"

    def run(self, p: Plan, layer: nn.Module, x: Tensor) -> Tensor:
        if p.path in ("torch", "dense"):
            return super().run(p, layer, x)
        d, D = layer.spec.target_dim, layer.spec.lifted_dim
        lead, N = x.shape[:-1], layer.out_features
        x2 = x.reshape(-1, layer.in_features)  # (B, n)
        side = (layer.s1, layer.L, layer.R, layer.s2_act)
        ops = torch.ops.liftquant
        if p.path == "fused_small":
            out = ops.fused_small_linear(x2, *side, layer.packed_signs, layer.scale, layer.bias,
                                         d, D, [N], p.pdl)
        elif p.path == "gemv":
            xp, wsc = ops.fused_transform(x2, *side, d, D, True, p.pdl, p.pdl_early)
            out = ops.int1_gemv(xp, wsc, layer.packed_signs, layer.scale, layer.bias, x.dtype,
                                self.tuner_id, p.pdl)
        elif p.path == "gemv_lut":
            xs = ops.fused_transform(x2, *side, d, D, False)[0]
            out = ops.int1_gemv_lut(xs, layer.packed_signs, layer.scale, layer.bias, x.dtype)
        else:
            if p.path in ("gemm_small", "gemm_fused_t"):
                xs = ops.fused_transform(x2, *side, d, D, False)[0]
            else:
                xs = layer.fused_input(x2)  # (B, K) batched torch matmuls
            gemm = ops.int1_gemm_small if p.path == "gemm_small" else ops.int1_gemm
            out = gemm(xs, layer.packed_signs, layer.scale, layer.bias)
        return out.reshape(*lead, N)
