"""One-launch decode of small packed layers: T* computed inside the GEMV program.

On 0.1-0.5B models every matrix is small, and a decode step is paid in kernel launches: T* then
the GEMV is two latency-bound launches per linear (or per q/k/v, gate/up group), where the bf16
model pays one cuBLAS GEMV (``bench/kernels/README.md``). Here each program owns ``RB`` output rows of
one layer (or group member) and computes that member's whole transform itself, ``H = (L Xs) R *
s2`` in 16-row chunks of H (two ``tl.dot`` each, the reference's roundings to the activation
dtype), then multiplies it with its rows' signs, unpacked from the packed bytes at the lifted
index ``k = i C + c`` (LSB first, ``pack.py``), and sums in fp32. The transform is recomputed by
every program, which is cheap only while x, L and R are a few KB: :func:`fits` bounds the
shapes. Per sign this costs several instructions against one in the pair-layout GEMV, so large
layers keep the two-kernel path.

When this path runs is the planner's decision (``policy.plan``, ``KernelPolicy.fused_small``,
``LIFTQUANT_FUSED_SMALL``): ``auto`` (default) takes it where it fits and the kernels launch
without PDL: with PDL the GEMV's launch and weight loads already hide under T*, and on the H100
the two kernels then decoded SmolLM2's shape faster; without PDL this path was the faster
(both measured in ``bench/kernels/README.md``, fifth run). It also takes a finished input, so
the decode step's norm / SiLU prologues skip these layers. ``1`` uses it wherever it fits,
``0`` never.
"""

from __future__ import annotations

from typing import Optional  # custom_op schemas: Optional[Tensor] parses on torch 2.6+

import torch
from torch import Tensor

from liftquant.kernels.int1_words import HAS_TRITON, check_triton, device_ctx, pdl_launch
from liftquant.kernels.policy import FUSED_SMALL_MAX_H_TILE as MAX_H_TILE
from liftquant.kernels.policy import FUSED_SMALL_MAX_X_TILE as MAX_X_TILE
from liftquant.kernels.policy import fits_fused_small as fits

# Largest padded H tile (rows x columns, N1P x CP) and padded Xs tile (N1P x N2P) a program
# recomputes (MAX_H_TILE, MAX_X_TILE, kept in ``policy``). Measured on the H100
# (bench/kernels/README.md): with every SmolLM2 and Qwen2.5-0.5B layer up to 64 x 128 on this path,
# SmolLM2 decoded faster but Qwen slower: the kernel's per-sign cost outweighs the saved
# launch once H is 32 x 128. So only the smallest tiles take it (SmolLM2's 576-wide inputs).
ROWS_PER_PROGRAM = 8
H_CHUNK = 16  # rows of H per step (tl.dot's smallest M)
__all__ = ["MAX_H_TILE", "MAX_X_TILE", "fits", "fused_small_linear", "launch_fused_small"]


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(int(n), 1) - 1).bit_length())


if HAS_TRITON:
    import triton
    import triton.language as tl

    from liftquant.kernels.gemv_splitk import _member
    from liftquant.kernels.int1_words import grid_wait

    @triton.jit
    def _fused_small_kernel(
        X, S1, L, R, S2, P, SCALE, BIAS, OUT, N, N0, N1, RBYTES,
        n: tl.constexpr, n1: tl.constexpr, n2: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
        N1P: tl.constexpr, N2P: tl.constexpr, CP: tl.constexpr, RB: tl.constexpr,
        HC: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
    ):
        m, r_first, r_stop = _member(N, N0, N1, RB)
        b = tl.program_id(2).to(tl.int64)
        m64 = m.to(tl.int64)
        NB = C // D
        S1 += m64 * n
        L += m64 * n1 * n1
        R += m64 * n2 * C
        S2 += m64 * n1 * NB
        XDT = X.dtype.element_ty
        rows = r_first + tl.arange(0, RB)
        rmask = rows < r_stop
        a = tl.arange(0, N1P)
        j2 = tl.arange(0, N2P)
        c = tl.arange(0, CP)
        # Xs = pad(x) / s1 viewed (n1, n2), and R: loaded once, reused by every chunk of H.
        # Everything but x loads first: with PDL, while the kernel that writes x finishes.
        idx = a[:, None] * n2 + j2[None, :]
        msk = (a < n1)[:, None] & (j2 < n2)[None, :] & (idx < n)
        s1v = tl.load(S1 + idx, mask=msk, other=1.0).to(XDT)
        rt = tl.load(R + j2[:, None] * C + c[None, :],
                     mask=(j2 < n2)[:, None] & (c < C)[None, :], other=0.0).to(XDT)
        lts = ()
        for i0 in tl.static_range(0, N1P, HC):
            ii = i0 + tl.arange(0, HC)
            lts = lts + (tl.load(L + ii[:, None] * n1 + a[None, :],
                                 mask=(ii < n1)[:, None] & (a < n1)[None, :], other=0.0),)
        grid_wait(PDL)
        xv = tl.load(X + b * n + idx, mask=msk, other=0.0)
        xs = tl.fdiv(xv.to(tl.float32), s1v.to(tl.float32)).to(XDT)
        prow = P + rows.to(tl.int64) * RBYTES  # (RB,) row starts in the packed bytes
        acc = tl.zeros((RB,), tl.float32)
        for i0 in tl.static_range(0, N1P, HC):
            ii = i0 + tl.arange(0, HC)
            imask = ii < n1
            u = tl.dot(lts[i0 // HC].to(XDT), xs).to(XDT)  # (HC, N2P) rows ii of U = L Xs
            h = tl.dot(u, rt).to(XDT).to(tl.float32)  # (HC, CP) rows ii of H
            hmask = imask[:, None] & (c < C)[None, :]
            s2 = tl.load(S2 + ii[:, None] * NB + (c // D)[None, :], mask=hmask, other=0.0)
            h = (h * s2.to(XDT).to(tl.float32)).to(XDT).to(tl.float32)
            k = ii[:, None] * C + c[None, :]  # (HC, CP) lifted index
            byt = tl.load(prow[:, None, None] + (k // 8)[None, :, :],
                          mask=rmask[:, None, None] & hmask[None, :, :], other=0).to(tl.int32)
            bit = (byt >> (k % 8)[None, :, :]) & 1
            sgn = (bit * 2 - 1).to(tl.float32)  # masked slots meet h = 0
            acc += tl.sum(tl.sum(sgn * h[None, :, :], axis=2), axis=1)
        out = acc * tl.load(SCALE + rows, mask=rmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            out += tl.load(BIAS + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(OUT + b * N + rows, out.to(OUT.dtype.element_ty), mask=rmask)


def launch_fused_small(x: Tensor, s1: Tensor, L: Tensor, R: Tensor, s2_act: Tensor,
                       packed: Tensor, scale: Tensor, bias: Tensor | None, *, d: int, D: int,
                       members: tuple[int, ...] | None = None,
                       rows_per_program: int = ROWS_PER_PROGRAM, pdl: bool = False) -> Tensor:
    """``scale * (Y @ T*(x)) + bias`` for ``x`` (B, n) in one launch: (B, sum(members)).

    Side tensors of one layer, or stacked for a group (``s1`` (M, n) ...), with the packed rows
    concatenated (``members`` rows each), as ``fused_transform`` / ``int1_gemv_group`` take.
    """
    from liftquant.kernels.gemv_splitk import check_members

    check_triton(x)
    B, n = x.shape
    M = L.shape[0] if L.dim() == 3 else 1
    n1, n2, C = L.shape[-1], R.shape[-2], R.shape[-1]
    N = packed.shape[0]
    N0, N1 = check_members(members, N, M)
    if not fits(n1, n2, C):
        raise ValueError(f"block shape ({n1}, {n2}) with {C} lifted columns is too large for "
                         "the one-launch path; use fused_transform + int1_gemv")
    G = sum(-(-m // rows_per_program) for m in (members or (N,)))
    out = torch.empty(B, N, device=x.device, dtype=x.dtype)
    with device_ctx(x):
        _fused_small_kernel[(1, G, B)](
            x.contiguous(), s1.contiguous(), L.contiguous(), R.contiguous(),
            s2_act.contiguous(), packed.contiguous(), scale, bias if bias is not None else scale,
            out, N, N0, N1, packed.shape[1], n=n, n1=n1, n2=n2, C=C, D=D, N1P=_pow2(n1),
            N2P=_pow2(n2), CP=_pow2(C), RB=rows_per_program, HC=H_CHUNK,
            HAS_BIAS=bias is not None, num_warps=4, **pdl_launch(pdl))
    return out


@torch.library.custom_op("liftquant::fused_small_linear", mutates_args=())
def fused_small_linear(x: Tensor, s1: Tensor, L: Tensor, R: Tensor, s2_act: Tensor,
                       packed: Tensor, scale: Tensor, bias: Optional[Tensor],  # noqa: UP045
                       d: int, D: int, members: list[int], pdl: bool = False) -> Tensor:
    """One-launch T* + GEMV of a small layer or group; see :func:`launch_fused_small`."""
    return launch_fused_small(x, s1, L, R, s2_act, packed, scale, bias, d=d, D=D,
                              members=tuple(members), pdl=pdl)


@fused_small_linear.register_fake
def _(x, s1, L, R, s2_act, packed, scale, bias, d, D, members, pdl=False):
    return x.new_empty(x.shape[0], packed.shape[0])
