"""Kernel backends for ``PackedLiftLinear``, chosen by name or by capability (STYLE 2.1.6-7).

Backends (each exposes ``linear(layer, x) -> Tensor``):

* ``torch``: unpack -> matmul (``torch_ref``); always available, the numerical oracle.
* ``triton``: fused ``T*`` transform + int1 GEMV (decode; split-K row stream or row tile,
  chosen per shape by ``gemv_tuner``; the smallest layers in one launch, ``fused_small``) /
  GEMM (batches) (``triton_int1``); CUDA, or CPU tensors under ``TRITON_INTERPRET=1``.
* ``bitblas``: BitBLAS int1 matmul (``bitblas_backend``), imported lazily. BitBLAS 0.1.x links
  the CUDA 12 runtime and fails to build its kernels on Hopper with CUDA 13; asking for it then
  warns once with the reason and falls back to ``auto``.

``get_backend("auto", device)`` picks ``triton`` on CUDA when Triton imports, else ``torch``.
``set_backend(model, name)`` sets the ``backend`` attribute of every packed layer; the layer's
``forward`` resolves it per call (a dictionary lookup once resolved).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from typing import Protocol

import torch
from torch import Tensor, nn

from liftquant.log import get_logger

logger = get_logger("kernels")

AUTO = "auto"


def _torch_backend() -> Backend:
    from liftquant.kernels.torch_ref import TorchBackend

    return TorchBackend()


def _triton_backend() -> Backend:
    return TritonBackend()


def _bitblas_backend() -> Backend:
    from liftquant.kernels.bitblas_backend import BitblasBackend  # bitblas itself stays lazy

    return BitblasBackend()


# name -> factory. Factories import on first use, so importing this module never imports
# Triton or BitBLAS; plain import statements (no importlib) keep them traceable by Dynamo.
_BACKENDS: dict[str, Callable[[], Backend]] = {
    "torch": _torch_backend,
    "triton": _triton_backend,
    "bitblas": _bitblas_backend,
}
# Tokens up to which the Triton backend runs the decode GEMV (one pass over the weights per
# token); larger batches use the tensor-core GEMM.
GEMV_MAX_TOKENS = 1
# Tokens up to which T* runs as one fused Triton launch; beyond, batched torch matmuls are
# already well shaped.
TRANSFORM_MAX_TOKENS = 16


class Backend(Protocol):
    name: str

    def linear(self, layer: nn.Module, x: Tensor) -> Tensor: ...


class KernelCache:
    """Per-backend cache of built kernels / launch configurations keyed by problem shape."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._entries: dict[Hashable, object] = {}

    def lookup(self, key: Hashable) -> object | None:
        return self._entries.get(key)

    def get(self, key: Hashable, build: Callable[[], object]) -> object:
        value = self._entries.get(key)
        if value is None:
            value = self._entries[key] = build()
        return value

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()


class _State:
    """Backend instances, resolved (name, device) pairs and the warn-once record."""

    def __init__(self) -> None:
        self.instances: dict[str, Backend] = {}
        self.resolved: dict[tuple[str, str, int | None], Backend] = {}
        self.warned: set[str] = set()


_STATE = _State()


def reset() -> None:
    """Forget resolved backends and issued warnings (tests)."""
    global _STATE
    _STATE = _State()


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Register a backend factory under ``name`` (called once, on first use)."""
    _BACKENDS[name.lower()] = factory
    reset()


def backend_names() -> list[str]:
    return [AUTO, *sorted(_BACKENDS)]


def warn_once(key: str, message: str) -> None:
    if key not in _STATE.warned:
        _STATE.warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        logger.warning(message)


def _instance(name: str) -> Backend:
    backend = _STATE.instances.get(name)
    if backend is None:
        backend = _STATE.instances[name] = _BACKENDS[name]()
    return backend


def _check_name(name: str) -> str:
    key = str(name).lower()
    if key != AUTO and key not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose from {', '.join(backend_names())}")
    return key


def _resolve(name: str, device: torch.device) -> Backend:
    if name == AUTO:  # the interpreter is for tests: auto never picks Triton on CPU
        use_triton = device.type == "cuda" and TritonBackend.unavailable_reason(device) is None
        return _instance("triton" if use_triton else "torch")
    cls_reason = getattr(type(_instance(name)), "unavailable_reason", None)
    reason = cls_reason(device) if cls_reason is not None else None
    if reason is None:
        return _instance(name)
    fallback = _resolve(AUTO, device)
    warn_once(f"{name}:{device.type}", f"liftquant: kernel backend {name!r} is unavailable "
              f"on {device.type} ({reason}); falling back to {fallback.name!r}")
    return fallback


def get_backend(name: str = AUTO, device: torch.device | str | None = None) -> Backend:
    """The backend called ``name`` for ``device`` (default: CUDA if available, else CPU).

    Unknown names raise ``ValueError`` listing the registered ones; a known but unavailable
    backend warns once and falls back to ``auto``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    key = (str(name).lower(), device.type, device.index)
    backend = _STATE.resolved.get(key)
    if backend is None:
        backend = _STATE.resolved[key] = _resolve(_check_name(name), device)
    return backend


def set_backend(model: nn.Module, name: str) -> int:
    """Set ``backend = name`` on every ``PackedLiftLinear`` in ``model``; returns the count."""
    from liftquant.linear import PackedLiftLinear  # circular at import time

    name = _check_name(name)
    layers = [m for m in model.modules() if isinstance(m, PackedLiftLinear)]
    for layer in layers:
        layer.backend = name
    for device in {layer.packed_signs.device for layer in layers}:
        if device.type != "meta":
            get_backend(name, device)  # resolve (and warn) now, not inside a compiled trace
    return len(layers)


def kernel_input(x: Tensor) -> bool:
    """Whether ``x`` can go through the Triton kernels: half precision, and no autograd (they
    have no backward formula); anything else takes the torch reference."""
    return x.dtype in (torch.float16, torch.bfloat16) and not (
        x.requires_grad and torch.is_grad_enabled())


class TritonBackend:
    """Fused T* + int1 GEMV for decode, T* + unpack-to-tile GEMM for batches."""

    name = "triton"

    @property
    def cache(self) -> KernelCache:
        """Tuned GEMV configurations keyed by shape."""
        from liftquant.kernels import triton_int1

        return triton_int1.GEMV_TUNER.cache

    @staticmethod
    def unavailable_reason(device: torch.device) -> str | None:
        from liftquant.kernels import triton_int1

        if not triton_int1.HAS_TRITON:
            return "Triton is not importable"
        if device.type == "cuda" or (device.type == "cpu" and triton_int1.interpreting()):
            return None
        return "Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"

    def linear(self, layer: nn.Module, x: Tensor) -> Tensor:
        from liftquant.kernels import fused_small, torch_ref

        if not kernel_input(x):
            return torch_ref.linear(layer, x)
        d, D = layer.spec.target_dim, layer.spec.lifted_dim
        lead, N = x.shape[:-1], layer.out_features
        x2 = x.reshape(-1, layer.in_features)  # (B, n)
        B = x2.shape[0]
        side = (layer.s1, layer.L, layer.R, layer.s2_act)
        if B <= GEMV_MAX_TOKENS and fused_small.applies(layer, x):
            out = torch.ops.liftquant.fused_small_linear(x2, *side, layer.packed_signs,
                                                         layer.scale, layer.bias, d, D, [N])
        elif B <= GEMV_MAX_TOKENS:
            xp, wsc = torch.ops.liftquant.fused_transform(x2, *side, d, D, True,
                                                          layer.packed_signs.numel())
            out = torch.ops.liftquant.int1_gemv(xp, wsc, layer.packed_signs, layer.scale,
                                                layer.bias, x.dtype)
        else:
            if B <= TRANSFORM_MAX_TOKENS:
                xs = torch.ops.liftquant.fused_transform(x2, *side, d, D, False)[0]
            else:
                xs = layer.fused_input(x2)  # (B, K) batched torch matmuls
            out = torch.ops.liftquant.int1_gemm(xs, layer.packed_signs, layer.scale, layer.bias)
        return out.reshape(*lead, N)
