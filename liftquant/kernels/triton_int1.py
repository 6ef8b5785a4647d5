"""Triton kernels for the fused LiftQuant decode ``o = s * (Y @ T*(x)) + b`` (paper Eq. 4).

Three kernels, each wrapped as a ``torch.library.custom_op`` (namespace ``liftquant``) with a
``register_fake`` so torch.compile and CUDA graphs see them as opaque nodes:

* ``fused_transform``: ``T*(x)`` for a few tokens in one launch: ``Xs = pad(x) / s1`` viewed
  ``(n1, n2)``, ``H = (L Xs) R``, ``H * s2`` (two ``tl.dot`` per tile). With ``pairs=True`` the
  output is written in the GEMV's *pair layout* (below) with one power-of-two scale per tile,
  otherwise as plain ``(B, K)`` activations in the input dtype.
* ``int1_gemv`` (decode, batch 1): the packed weights against activations in the pair layout
  (``int1_words``), with the launch configuration measured per shape (``gemv_tuner``) over two
  kernels: the split-K row stream (``gemv_splitk``: activations held in registers, weights
  streamed) and the row tile (``gemv_rowtile``, the previous kernel, kept as fallback).
* ``int1_gemm`` (prefill / batches): unpacks a ``(BN, BK)`` tile of signs to +-1 in registers and
  feeds ``tl.dot`` with the plain activations.

Legend: ``B`` tokens, ``n`` in_features, ``N`` out_features, ``(n1, n2)`` block shape, ``C =
(n2 / d) D`` columns of ``R``, ``K = n1 C`` lifted width, ``KW = ceil(K / 32)`` packed words per
token, ``RB`` packed bytes per weight row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional  # custom_op schemas: Optional[Tensor] parses on torch 2.6+

import torch
from torch import Tensor

# Re-exported: the GEMV pieces used to live here (tests, scripts and registry import them).
from liftquant.kernels.gemv_rowtile import (  # noqa: F401
    GEMV_CANDIDATES,
    UNALIGNED_MAX_BLOCK_N,
    GemvConfig,
    launch_gemv,
    pick_gemv_config,
)
from liftquant.kernels.gemv_splitk import SplitKConfig, launch_gemv_splitk  # noqa: F401
from liftquant.kernels.gemv_tuner import GEMV_TUNER, GemvTuner, gemv, tuner_by_id  # noqa: F401
from liftquant.kernels.int1_words import (  # noqa: F401
    HAS_TRITON,
    WORD_BITS,
    X_LIMIT,
    check_triton,
    device_ctx,
    pair_exponent,
    pdl_launch,
)
from liftquant.kernels.policy import interpreting


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(int(n), 1) - 1).bit_length())


if HAS_TRITON:
    import triton
    import triton.language as tl

    from liftquant.kernels.int1_words import grid_launch_dependents, grid_wait

    # ---------------------------------------------------------------- fused transform T*
    @triton.jit
    def _transform_kernel(
        X, S1, L, R, S2, OUT, WSC, X2, GAMMA, HOUT, EPS,
        n: tl.constexpr, n1: tl.constexpr, n2: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
        K: tl.constexpr, KW: tl.constexpr,  # shapes are constexpr: one build per layer shape
        N1P: tl.constexpr, N2P: tl.constexpr, CP: tl.constexpr, BR: tl.constexpr,
        BK1: tl.constexpr, CC: tl.constexpr, WT: tl.constexpr, PAIRS: tl.constexpr,
        PDL: tl.constexpr, EARLY: tl.constexpr, PRO: tl.constexpr,
    ):
        if EARLY:
            grid_launch_dependents(PDL)  # the GEMV may launch now and load its weights
        rb = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        m = tl.program_id(2).to(tl.int64)  # group member: its own s1, L, R, s2, same x
        o = m * tl.num_programs(1) + b  # output slot (member-major)
        NB = C // D  # d-chunks per row of the (n1, n2) view: s2_act (n1, NB, 1)
        S1 += m * n
        L += m * n1 * n1
        R += m * n2 * C
        S2 += m * n1 * NB
        XDT = X.dtype.element_ty
        rows = rb * BR + tl.arange(0, BR)  # rows i of H
        rmask = rows < n1
        j2 = tl.arange(0, N2P)
        # Every global load is issued before the first dot, so the program waits for memory
        # once (this kernel is latency bound: a few programs, tiny matmuls). The factors come
        # first: with PDL they load while the kernel that writes x finishes.
        rts = ()
        s2s = ()
        for c0 in tl.static_range(0, CP, CC):
            c = c0 + tl.arange(0, CC)
            rts = rts + (tl.load(R + j2[:, None] * C + c[None, :],
                                 mask=(j2 < n2)[:, None] & (c < C)[None, :], other=0.0),)
            s2s = s2s + (tl.load(S2 + rows[:, None] * NB + (c // D)[None, :],
                                 mask=rmask[:, None] & (c < C)[None, :], other=0.0),)
        lts = ()
        s1s = ()
        gms = ()
        idxs = ()
        msks = ()
        for a0 in tl.static_range(0, N1P, BK1):
            a = a0 + tl.arange(0, BK1)
            lts = lts + (tl.load(L + rows[:, None] * n1 + a[None, :],
                                 mask=rmask[:, None] & (a < n1)[None, :], other=0.0),)
            idx = a[:, None] * n2 + j2[None, :]  # (BK1, N2P) flat input index
            msk = (a < n1)[:, None] & (j2 < n2)[None, :] & (idx < n)
            idxs = idxs + (idx,)
            msks = msks + (msk,)
            s1s = s1s + (tl.load(S1 + idx, mask=msk, other=1.0).to(XDT),)  # divides in XDT
            if PRO == 1:
                gms = gms + (tl.load(GAMMA + idx, mask=msk, other=0.0).to(XDT),)
        grid_wait(PDL)  # x is the previous kernel's output
        # The prologue (PRO) builds the layer input x in the decode step's roundings:
        # 0: x as given; 1: h = x + x2 (residual add, written to HOUT by the first program of
        # each token), x = gamma * (h * rsqrt(mean(h^2) + eps)) (RMSNorm); 2: x = silu(x) * x2.
        xvs = ()
        ssq = 0.0
        for i in tl.static_range(N1P // BK1):
            idx = idxs[i]
            msk = msks[i]
            xv = tl.load(X + b * n + idx, mask=msk, other=0.0)
            # Two-operand ops in the model dtype run as fp32 ops rounded to XDT, as torch's do.
            if PRO == 1:
                x2v = tl.load(X2 + b * n + idx, mask=msk, other=0.0)
                xv = (xv.to(tl.float32) + x2v.to(tl.float32)).to(XDT)
                if (rb == 0) & (m == 0):  # one program per token writes the residual
                    tl.store(HOUT + b * n + idx, xv, mask=msk)
                hf = xv.to(tl.float32)
                ssq += tl.sum(tl.sum(hf * hf, axis=1), axis=0)
            elif PRO == 2:
                g = xv.to(tl.float32)
                act = (g * tl.sigmoid(g)).to(XDT)
                up = tl.load(X2 + b * n + idx, mask=msk, other=0.0)
                xv = (act.to(tl.float32) * up.to(tl.float32)).to(XDT)
            xvs = xvs + (xv,)
        if PRO == 1:
            rstd = 1.0 / tl.sqrt(ssq / n + EPS)
        xs = ()
        for i in tl.static_range(N1P // BK1):
            xv = xvs[i]
            if PRO == 1:
                xn = (xv.to(tl.float32) * rstd).to(XDT)
                xv = (gms[i].to(tl.float32) * xn.to(tl.float32)).to(XDT)
            xs = xs + (tl.fdiv(xv.to(tl.float32), s1s[i].to(tl.float32)).to(XDT),)
        if not EARLY:
            grid_launch_dependents(PDL)  # every load issued: the GEMV's loads come next
        # U = L[rows, :] @ Xs, Xs = pad(x) / s1 viewed (n1, n2)          (BR, N2P)
        U = tl.zeros((BR, N2P), tl.float32)
        for i in tl.static_range(N1P // BK1):
            U += tl.dot(lts[i].to(XDT), xs[i])
        Uq = U.to(XDT)
        # H = (U @ R) * s2 per column chunk, each rounded to XDT as the reference does
        hs = ()
        habs = tl.zeros((BR, CC), tl.float32)
        for i in tl.static_range(CP // CC):
            h = tl.dot(Uq, rts[i].to(XDT)).to(XDT).to(tl.float32)
            h = (h * s2s[i].to(XDT).to(tl.float32)).to(XDT).to(tl.float32)
            hs = hs + (h,)
            habs = tl.maximum(habs, tl.abs(h))  # elementwise: one cross-warp reduction below
        inv = 1.0
        if PAIRS:  # tile max |H| -> power-of-two scale
            amax = tl.max(tl.max(habs, axis=1), axis=0)
            e = tl.ceil(tl.log2(tl.maximum(amax, 1e-30)) + 10.0)  # |x| * 2^-e <= X_LIMIT
            e = tl.minimum(tl.maximum(e, -120.0), 120.0)
            inv = tl.exp2(-e)
            nwords = BR * C // 32  # tiles are word aligned (BR * C % 32 == 0)
            qi = rb * nwords + tl.arange(0, WT)
            tl.store(WSC + o * KW + qi, tl.zeros((WT,), tl.float32) + tl.exp2(e),
                     mask=(tl.arange(0, WT) < nwords) & (qi < KW))
        for i in tl.static_range(CP // CC):
            c = i * CC + tl.arange(0, CC)
            h = hs[i]
            k = rows[:, None] * C + c[None, :]  # (BR, CC) lifted index
            if PAIRS:  # rows >= n1 are zero: they write the padding of the last word
                q = k // 32
                j = k % 32
                p = j % 16
                # y_p = 2^e_p x for p < 15 (see the GEMV, pair_exponent), y_15 = -x
                ep = tl.where(p == 12, 12, tl.where(p == 13, 8, tl.where(p == 14, 0, 25 - p)))
                f = tl.where(p == 15, -1.0, tl.exp2(ep.to(tl.float32)))
                hw = (o * 16 * KW + p * KW + q) * 2 + j // 16  # fp16 slot in XP
                tl.store(OUT + hw, (h * inv * f).to(tl.float16),
                         mask=(c < C)[None, :] & (k < KW * 32))
            else:
                tl.store(OUT + o * K + k, h.to(XDT), mask=rmask[:, None] & (c < C)[None, :])

    # ---------------------------------------------------------------- int1 GEMM (prefill)
    @triton.jit
    def _gemm_body(XS, P, SCALE, BIAS, OUT, B, N, K, RB,
                   HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr):
        pm = tl.program_id(0)
        pn = tl.program_id(1)
        XDT = XS.dtype.element_ty
        toks = pm * BM + tl.arange(0, BM)
        rows = pn * BN + tl.arange(0, BN)
        tmask = toks < B
        rmask = rows < N
        bit = tl.arange(0, 8)
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            a = tl.load(XS + toks.to(tl.int64)[:, None] * K + ks[None, :],
                        mask=tmask[:, None] & (ks < K)[None, :], other=0.0)
            kb = k0 // 8 + tl.arange(0, BK // 8)
            byt = tl.load(P + rows.to(tl.int64)[:, None] * RB + kb[None, :],
                          mask=rmask[:, None] & (kb < RB)[None, :], other=0).to(tl.int32)
            bits = (byt[:, :, None] >> bit[None, None, :]) & 1  # (BN, BK/8, 8)
            y = (tl.reshape(bits, (BN, BK)) * 2 - 1).to(XDT)  # +-1, LSB-first order
            acc = tl.dot(a, tl.trans(y), acc)
        out = acc * tl.load(SCALE + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            out += tl.load(BIAS + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + toks.to(tl.int64)[:, None] * N + rows[None, :], out.to(XDT),
                 mask=tmask[:, None] & rmask[None, :])

    @triton.jit
    def _gemm_kernel(XS, P, SCALE, BIAS, OUT, B, N, K, RB, HAS_BIAS: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        _gemm_body(XS, P, SCALE, BIAS, OUT, B, N, K, RB, HAS_BIAS, BM, BN, BK)

    @triton.jit
    def _gemm_kernel_interp(XS, P, SCALE, BIAS, OUT, B, N, K: tl.constexpr, RB,
                            HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            BK: tl.constexpr):
        _gemm_body(XS, P, SCALE, BIAS, OUT, B, N, K, RB, HAS_BIAS, BM, BN, BK)


# -------------------------------------------------------------------- configs
@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int


def pick_gemm_config(B: int, N: int) -> GemmConfig:
    if B <= 16:
        return GemmConfig(16, 64, 128, 4)
    if B <= 64:
        return GemmConfig(64, 64, 64, 4)
    return GemmConfig(128, 128, 64, 8)


# -------------------------------------------------------------------- launch helpers
def transform_tile_rows(C: int) -> int:
    """Rows of H per transform program: tiles must hold whole 32-weight words."""
    return 16 if (16 * C) % WORD_BITS == 0 else 32


PROLOGUES = {"none": 0, "add_norm": 1, "silu_mul": 2}


def launch_transform(x: Tensor, s1: Tensor, L: Tensor, R: Tensor, s2_act: Tensor, *,
                     d: int, D: int, pairs: bool, tile_rows: int | None = None,
                     chunk: int | None = None, num_warps: int | None = None,
                     prologue: str = "none", x2: Tensor | None = None,
                     gamma: Tensor | None = None, eps: float = 0.0,
                     pdl: bool = False, pdl_early: bool = True) -> tuple[Tensor, ...]:
    """``T*(x)`` for ``x`` (B, n): pairs -> (XP int32 (B, 16, KW), word scales (B, KW) fp32),
    plain -> ((B, K) in x.dtype, empty).

    A group of ``M`` layers that read the same input (q/k/v) passes its side tensors stacked,
    ``s1`` (M, n), ``L`` (M, n1, n1), ``R`` (M, n2, C), ``s2_act`` (M, n1, NB, 1): one launch,
    outputs member-major, (M B, 16, KW) and (M B, KW) (plain: (M B, K)).
    ``tile_rows`` (rows of H per program, word aligned), ``chunk`` (columns per dot) and
    ``num_warps`` override the defaults (benchmarks).

    ``prologue`` computes the layer input in the same launch, as the decode step would:
    ``"add_norm"``: residual ``h = x + x2``, input ``gamma * RMSNorm(h)`` (``eps``), and ``h``
    is returned as a third output; ``"silu_mul"``: input ``silu(x) * x2`` (the MLP's gate and
    up projections).

    ``pdl``: launch with programmatic dependent launch, as the GEMV that reads the output does
    (the planner's decision, ``policy.plan``); ``pdl_early``: let that GEMV launch at this
    kernel's start (else once its loads are issued).
    """
    check_triton(x)
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue {prologue!r}: use one of {sorted(PROLOGUES)}")
    pro = PROLOGUES[prologue]
    if pro and (x2 is None or x2.shape != x.shape or (pro == 1 and gamma is None)):
        raise ValueError(f"prologue {prologue!r} needs x2 of x's shape {tuple(x.shape)}"
                         + (" and gamma" if pro == 1 else ""))
    B, n = x.shape
    M = L.shape[0] if L.dim() == 3 else 1
    n1, n2, C = L.shape[-1], R.shape[-2], R.shape[-1]
    K = n1 * C
    KW = -(-K // WORD_BITS)
    BR = tile_rows or transform_tile_rows(C)
    if pairs and (BR * C) % WORD_BITS:
        raise ValueError(f"tile_rows={BR}: a tile of {BR} x {C} is not whole 32-sign words")
    N1P, N2P = _pow2(n1), _pow2(n2)
    CC = chunk or (64 if C > 32 else 32)
    CP = -(-C // CC) * CC
    BK1 = min(N1P, 64)
    WT = _pow2(BR * CP // WORD_BITS, floor=1)
    if pairs:
        out = torch.empty(M * B, 16, 2 * KW, device=x.device, dtype=torch.float16)
        wsc = torch.empty(M * B, KW, device=x.device, dtype=torch.float32)
    else:
        out = torch.empty(M * B, K, device=x.device, dtype=x.dtype)
        wsc = torch.empty(M * B, 0, device=x.device, dtype=torch.float32)
    h_out = torch.empty_like(x) if pro == 1 else x.new_empty(0)
    grid = (-(-n1 // BR), B, M)
    num_warps = num_warps or (8 if max(N1P, N2P) >= 128 else 4)
    x = x.contiguous()
    with device_ctx(x):
        _transform_kernel[grid](
            x, s1.contiguous(), L.contiguous(), R.contiguous(), s2_act.contiguous(), out, wsc,
            x2.contiguous() if pro else x, gamma.contiguous() if pro == 1 else x, h_out,
            float(eps), n=n, n1=n1, n2=n2, C=C, D=D, K=K, KW=KW, N1P=N1P, N2P=N2P, CP=CP,
            BR=BR, BK1=BK1, CC=CC, WT=WT, PAIRS=pairs, num_warps=num_warps,
            EARLY=pdl_early, PRO=pro, **pdl_launch(pdl))
    out = out.view(torch.int32) if pairs else out
    return (out, wsc, h_out) if pro == 1 else (out, wsc)


def launch_gemm(xs: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None, *,
                block_m: int, block_n: int = 64, block_k: int = 64,
                num_warps: int = 4) -> Tensor:
    """``out = scale * (xs @ Y^T) + bias`` for ``xs`` (B, K) with ``Y`` unpacked per tile."""
    check_triton(xs)
    B, K = xs.shape
    N, RB = packed.shape
    out = torch.empty(B, N, device=xs.device, dtype=xs.dtype)
    kernel = _gemm_kernel_interp if interpreting() else _gemm_kernel
    grid = (-(-B // block_m), -(-N // block_n))
    with device_ctx(xs):
        kernel[grid](xs.contiguous(), packed.contiguous(), scale,
                     bias if bias is not None else scale, out, B, N, K, RB,
                     HAS_BIAS=bias is not None, BM=block_m, BN=block_n, BK=block_k,
                     num_warps=num_warps)
    return out


# -------------------------------------------------------------------- custom ops
@torch.library.custom_op("liftquant::fused_transform", mutates_args=())
def fused_transform(x: Tensor, s1: Tensor, L: Tensor, R: Tensor, s2_act: Tensor, d: int, D: int,
                    pairs: bool, pdl: bool = False,
                    pdl_early: bool = True) -> tuple[Tensor, Tensor]:
    """Fused ``T*(x)`` (Eq. 4) for ``x`` (B, n); see :func:`launch_transform`."""
    return launch_transform(x, s1, L, R, s2_act, d=d, D=D, pairs=pairs, pdl=pdl,
                            pdl_early=pdl_early)


@fused_transform.register_fake
def _fake_transform(x, s1, L, R, s2_act, d, D, pairs, pdl=False, pdl_early=True):
    M = L.shape[0] if L.dim() == 3 else 1
    B, K = x.shape[0] * M, L.shape[-1] * R.shape[-1]
    KW = -(-K // WORD_BITS)
    if pairs:
        return x.new_empty(B, 16, KW, dtype=torch.int32), x.new_empty(B, KW, dtype=torch.float32)
    return x.new_empty(B, K), x.new_empty(B, 0, dtype=torch.float32)


@torch.library.custom_op("liftquant::fused_norm_transform", mutates_args=())
def fused_norm_transform(h: Tensor, delta: Tensor, gamma: Tensor, eps: float, s1: Tensor,
                         L: Tensor, R: Tensor, s2_act: Tensor, d: int, D: int,
                         pdl: bool = False, pdl_early: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Residual add + RMSNorm + ``T*`` (pair layout) in one launch: (XP, word scales, h + delta);
    see :func:`launch_transform` with ``prologue="add_norm"``."""
    return launch_transform(h, s1, L, R, s2_act, d=d, D=D, pairs=True, prologue="add_norm",
                            x2=delta, gamma=gamma, eps=eps, pdl=pdl, pdl_early=pdl_early)


@fused_norm_transform.register_fake
def _(h, delta, gamma, eps, s1, L, R, s2_act, d, D, pdl=False, pdl_early=True):
    return (*_fake_transform(h, s1, L, R, s2_act, d, D, True), torch.empty_like(h))


@torch.library.custom_op("liftquant::fused_silu_transform", mutates_args=())
def fused_silu_transform(gate: Tensor, up: Tensor, s1: Tensor, L: Tensor, R: Tensor,
                         s2_act: Tensor, d: int, D: int, pdl: bool = False,
                         pdl_early: bool = True) -> tuple[Tensor, Tensor]:
    """``T*(silu(gate) * up)`` (pair layout) in one launch; see :func:`launch_transform` with
    ``prologue="silu_mul"``."""
    return launch_transform(gate, s1, L, R, s2_act, d=d, D=D, pairs=True, prologue="silu_mul",
                            x2=up, pdl=pdl, pdl_early=pdl_early)


@fused_silu_transform.register_fake
def _(gate, up, s1, L, R, s2_act, d, D, pdl=False, pdl_early=True):
    return _fake_transform(gate, s1, L, R, s2_act, d, D, True)


@torch.library.custom_op("liftquant::int1_gemv", mutates_args=())
def int1_gemv(xp: Tensor, wsc: Tensor, packed: Tensor, scale: Tensor, bias: Optional[Tensor],  # noqa: UP045
              out_dtype: torch.dtype, tuner_id: int = -1, pdl: bool = False) -> Tensor:
    """Decode GEMV from the pair layout with the configuration tuner ``tuner_id`` (the owning
    backend's, ``gemv_tuner.tuner_by_id``) chose for this shape; ``pdl``: the planner's launch
    decision."""
    return gemv(xp, wsc, packed, scale, bias, out_dtype, tuner=tuner_by_id(tuner_id), pdl=pdl)


@int1_gemv.register_fake
def _(xp, wsc, packed, scale, bias, out_dtype, tuner_id=-1, pdl=False):
    return xp.new_empty(xp.shape[0], packed.shape[0], dtype=out_dtype)


@torch.library.custom_op("liftquant::int1_gemm", mutates_args=())
def int1_gemm(xs: Tensor, packed: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:  # noqa: UP045
    """Prefill / batch GEMM ``scale * (xs @ Y^T) + bias``; see :func:`launch_gemm`."""
    cfg = pick_gemm_config(xs.shape[0], packed.shape[0])
    return launch_gemm(xs, packed, scale, bias, block_m=cfg.block_m, block_n=cfg.block_n,
                       block_k=cfg.block_k, num_warps=cfg.num_warps)


@int1_gemm.register_fake
def _(xs, packed, scale, bias):
    return xs.new_empty(xs.shape[0], packed.shape[0])


@torch.library.custom_op("liftquant::int1_gemv_group", mutates_args=())
def int1_gemv_group(xp: Tensor, wsc: Tensor, packed: Tensor, scale: Tensor,
                    bias: Optional[Tensor], out_dtype: torch.dtype,  # noqa: UP045
                    members: list[int], tuner_id: int = -1, pdl: bool = False) -> Tensor:
    """One decode GEMV for a group of layers reading the same input through their own T*
    (q/k/v, gate/up): ``xp`` (M B, 16, KW) member-major, packed rows concatenated with
    ``members`` rows each; returns (B, sum(members))."""
    return gemv(xp, wsc, packed, scale, bias, out_dtype, tuple(members),
                tuner=tuner_by_id(tuner_id), pdl=pdl)


@int1_gemv_group.register_fake
def _(xp, wsc, packed, scale, bias, out_dtype, members, tuner_id=-1, pdl=False):
    return xp.new_empty(xp.shape[0] // len(members), packed.shape[0], dtype=out_dtype)
