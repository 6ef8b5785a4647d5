"""Optional BitBLAS backend (the authors' release decodes with BitBLAS 0.1.0).

``bitblas`` is imported lazily. It links the CUDA 12 runtime (``libcudart.so.12``) and, on an
H100 with CUDA 13, fails to build its int1 kernels (shared/ASSETS.md); in every such case the
registry or :meth:`BitblasBackend.linear` warns once with the reason and falls back to
``auto`` (Triton on CUDA, else torch). When it works: ``T*(x)`` via the torch reference, then a
BitBLAS ``W_int1 x A_fp16`` matmul (int1 = {-1, +1}) per layer shape, built once and kept in a
:class:`~liftquant.kernels.registry.KernelCache`; the layer's transformed weight is cached on
the layer and rebuilt when ``packed_signs`` changes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from liftquant.kernels.cache import KernelCache
from liftquant.kernels.policy import KernelPolicy, default_policy
from liftquant.kernels.registry import get_backend, warn_once

# Token counts BitBLAS specialises its dynamic-shape kernel for (its documented default).
BITBLAS_M_RANGE = [1, 16, 32, 64, 128, 256, 512, 1024]
# Lifted width is padded to a multiple of this before handing it to BitBLAS.
BITBLAS_K_ALIGN = 128


class BitblasBackend:
    name = "bitblas"

    def __init__(self, policy: KernelPolicy | None = None) -> None:
        self.policy = policy if policy is not None else default_policy()
        self.cache = KernelCache(self.name)
        self.broken: str | None = None

    @staticmethod
    def unavailable_reason(device: torch.device, policy: KernelPolicy | None = None) -> str | None:
        if device.type != "cuda":
            return "BitBLAS needs a CUDA device"
        try:
            import bitblas  # noqa: F401
        except Exception as err:  # noqa: BLE001 - ImportError, OSError (no libcudart.so.12)
            return (f"cannot import bitblas: {type(err).__name__}: {err}. BitBLAS 0.1.x needs the "
                    "CUDA 12 runtime and does not build its kernels on Hopper with CUDA 13")
        return None

    def linear(self, layer: nn.Module, x: Tensor) -> Tensor:
        if self.broken is None:
            try:
                return self._linear(layer, x)
            except Exception as err:  # noqa: BLE001 - kernel build / launch failure
                self.broken = f"{type(err).__name__}: {err}"[:500]
        fallback = get_backend("auto", x.device, policy=self.policy)
        warn_once(f"bitblas-run:{x.device.type}", f"liftquant: BitBLAS kernels failed "
                  f"({self.broken}); falling back to {fallback.name!r}")
        return fallback.linear(layer, x)

    def _matmul(self, N: int, K: int):
        import bitblas

        config = bitblas.MatmulConfig(
            M=BITBLAS_M_RANGE, N=N, K=K, A_dtype="float16", W_dtype="int1",
            accum_dtype="float16", out_dtype="float16", layout="nt", with_bias=False,
            group_size=None, with_scaling=False, with_zeros=False, zeros_mode=None)
        return bitblas.Matmul(config=config, enable_tuning=False)

    def _weight(self, layer: nn.Module, matmul, K: int) -> Tensor:
        key = (layer.packed_signs.data_ptr(), layer.packed_signs._version)
        cached = getattr(layer, "_bitblas_weight", None)
        if cached is None or cached[0] != key:
            signs = layer.signs(torch.float32).to(torch.int8)  # (N, K_lifted) +-1
            signs = torch.nn.functional.pad(signs, (0, K - signs.shape[1]), value=1)
            cached = (key, matmul.transform_weight(signs.contiguous()))
            layer._bitblas_weight = cached
        return cached[1]

    def _linear(self, layer: nn.Module, x: Tensor) -> Tensor:
        lead, N = x.shape[:-1], layer.out_features
        K = -(-layer.lifted_width // BITBLAS_K_ALIGN) * BITBLAS_K_ALIGN
        matmul = self.cache.get(("matmul", N, K), lambda: self._matmul(N, K))
        xs = layer.fused_input(x.reshape(-1, layer.in_features).half())  # (B, K_lifted)
        xs = torch.nn.functional.pad(xs, (0, K - xs.shape[1]))  # padded signs meet zeros
        out = matmul(xs.contiguous(), self._weight(layer, matmul, K)) * layer.scale
        if layer.bias is not None:
            out = out + layer.bias
        return out.to(x.dtype).reshape(*lead, N)
