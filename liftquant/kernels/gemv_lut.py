"""Lookup-table int1 GEMV (decode): one table read and one add per 8 weights.

The pair-layout GEMVs (``gemv_splitk``, ``gemv_rowtile``) spend at least one integer and one
fp16x2 instruction per two weights; on an H100/H200 that alone costs about as much as
streaming the bits (issue 15). Here the activations of a K-slice are turned into tables once
per program and the packed bytes index them (LUT-GEMM / FLUTE style, our own formulation):

* a K-slice of ``G`` packed bytes (``8 G`` signs) is ``G`` groups of 8 activations ``x_g``;
* its table ``T[g, v] = sum_j x_g[j] (2 bit_j(v) - 1)`` for every byte value ``v`` (0..255),
  ``T = X S`` with ``X`` (G, 8) and the constant sign matrix ``S`` (8, 256), one ``tl.dot``
  (padded to 16 along j, exact in fp32);
* a weight row's slice sum is ``sum_g T[g, byte_g]``: per byte one index, one gather, one add.
  Bits are LSB first (``pack.py``): bit ``j`` of byte ``g`` is sign ``8 g + j`` of the slice.

Grid ``(S, R, B)``: slice ``s``, ``rows_per_program`` rows of group ``r`` (``block_n`` per
step), token ``b``. Each program writes fp32 slice partials ``(B, S, N)``; the launcher sums
them in slice order (deterministic) and applies scale and bias. The table is built once per
program and reused by all its rows, so its cost (``G x 256`` entries) is amortised over
``rows_per_program`` rows. Sums are fp32 throughout (the pair layout sums in fp16).

Status: validated against the torch reference under ``TRITON_INTERPRET=1``
(``tests/test_gemv_lut.py``); not yet timed on a GPU (``scripts/bench_kernels.py`` rows
``triton-gemv-lut``). How ``tl.gather`` lowers (shared memory vs shuffles) decides its speed.
The planner takes it for ``KernelPolicy.gemv_kind == "lut"`` (``LIFTQUANT_GEMV=lut``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional  # custom_op schemas: Optional[Tensor] parses on torch 2.6+

import torch
from torch import Tensor

from liftquant.kernels.int1_words import HAS_TRITON, check_triton, device_ctx
from liftquant.kernels.policy import interpreting


@dataclass(frozen=True)
class LutConfig:
    group_bytes: int = 32  # G: packed bytes (8 G signs) per K-slice; a power of two >= 16
    block_n: int = 16  # rows per step
    rows_per_program: int = 256
    num_warps: int = 4

    @property
    def label(self) -> str:
        return (f"lut:g{self.group_bytes}:n{self.block_n}:r{self.rows_per_program}"
                f":x{self.num_warps}")


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _lut_body(XS, P, PART, N, K, RB, n_steps, G: tl.constexpr, BN: tl.constexpr,
                  RPP: tl.constexpr):
        s = tl.program_id(0)
        r = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        S = tl.num_programs(0)
        # activations of the slice, (G, 16): columns 8..15 are zero padding for tl.dot
        gi = tl.arange(0, G)
        ji = tl.arange(0, 16)
        k = s * G * 8 + gi[:, None] * 8 + ji[None, :]  # (G, 16) signs of the slice
        x = tl.load(XS + b * K + k, mask=(ji < 8)[None, :] & (k < K), other=0.0)
        v = tl.arange(0, 256)
        sgn = (((v[None, :] >> ji[:, None]) & 1) * 2 - 1).to(tl.float32)  # (16, 256)
        sgn = tl.where((ji < 8)[:, None], sgn, 0.0)
        table = tl.dot(x.to(tl.float32), sgn, input_precision="ieee")  # (G, 256)
        flat = tl.reshape(table, (G * 256,))
        cols = s * G + gi  # packed byte columns of the slice
        row0 = r * RPP
        for i in range(n_steps):
            rows = row0 + i * BN + tl.arange(0, BN)
            rmask = (rows < N) & (rows < row0 + RPP)
            byt = tl.load(P + rows.to(tl.int64)[:, None] * RB + cols[None, :],
                          mask=rmask[:, None] & (cols < RB)[None, :], other=0).to(tl.int32)
            idx = tl.reshape(gi[None, :] * 256 + byt, (BN * G,))
            vals = tl.reshape(tl.gather(flat, idx, 0), (BN, G))
            acc = tl.sum(vals, axis=1)
            tl.store(PART + (b * S + s) * N + rows, acc, mask=rmask)

    @triton.jit
    def _lut_kernel(XS, P, PART, N, K, RB, n_steps, G: tl.constexpr, BN: tl.constexpr,
                    RPP: tl.constexpr):
        _lut_body(XS, P, PART, N, K, RB, n_steps, G, BN, RPP)

    @triton.jit
    def _lut_kernel_interp(XS, P, PART, N, K, RB, n_steps: tl.constexpr, G: tl.constexpr,
                           BN: tl.constexpr, RPP: tl.constexpr):
        # The interpreter (numpy 2) needs constexpr loop bounds; same body otherwise.
        _lut_body(XS, P, PART, N, K, RB, n_steps, G, BN, RPP)


def launch_gemv_lut(xs: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None,
                    out_dtype: torch.dtype, *, cfg: LutConfig = LutConfig()) -> Tensor:
    """``out[b] = scale * (Y @ xs_b) + bias`` for plain activations ``xs`` (B, K) (``T*`` with
    ``pairs=False``) and packed signs (N, RB): (B, N) in ``out_dtype``."""
    check_triton(xs)
    G = cfg.group_bytes
    if G < 16 or G & (G - 1):
        raise ValueError(f"group_bytes={G}: use a power of two >= 16")
    if cfg.rows_per_program % cfg.block_n:
        raise ValueError(f"rows_per_program must be a multiple of block_n: {cfg}")
    B, K = xs.shape
    N, RB = packed.shape
    S = -(-RB // G)
    R = -(-N // cfg.rows_per_program)
    part = torch.empty(B, S, N, device=xs.device, dtype=torch.float32)
    n_steps = cfg.rows_per_program // cfg.block_n
    kernel = _lut_kernel_interp if interpreting() else _lut_kernel
    with device_ctx(xs):
        kernel[(S, R, B)](xs.contiguous(), packed.contiguous(), part, N, K, RB, n_steps, G=G,
                          BN=cfg.block_n, RPP=cfg.rows_per_program, num_warps=cfg.num_warps)
    out = part.sum(dim=1) * scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


@torch.library.custom_op("liftquant::int1_gemv_lut", mutates_args=())
def int1_gemv_lut(xs: Tensor, packed: Tensor, scale: Tensor, bias: Optional[Tensor],  # noqa: UP045
                  out_dtype: torch.dtype) -> Tensor:
    """Lookup-table decode GEMV; see :func:`launch_gemv_lut`."""
    return launch_gemv_lut(xs, packed, scale, bias, out_dtype)


@int1_gemv_lut.register_fake
def _(xs, packed, scale, bias, out_dtype):
    return xs.new_empty(xs.shape[0], packed.shape[0], dtype=out_dtype)
