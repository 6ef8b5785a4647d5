"""Triton kernels for the fused LiftQuant decode ``o = s * (Y @ T*(x)) + b`` (paper Eq. 4).

Three kernels, each wrapped as a ``torch.library.custom_op`` (namespace ``liftquant``) with a
``register_fake`` so torch.compile and CUDA graphs see them as opaque nodes:

* ``fused_transform``: ``T*(x)`` for a few tokens in one launch: ``Xs = pad(x) / s1`` viewed
  ``(n1, n2)``, ``H = (L Xs) R``, ``H * s2`` (two ``tl.dot`` per tile). With ``pairs=True`` the
  output is written in the GEMV's *pair layout* (below) with one power-of-two scale per tile,
  otherwise as plain ``(B, K)`` activations in the input dtype.
* ``int1_gemv`` (decode, one token per program column): reads every packed weight word exactly
  once. A 32-bit word ``w`` holds signs ``k = 32q .. 32q + 31`` (LSB first, ``pack.py``). The
  pair layout stores activations ``32q + p`` and ``32q + p + 16`` as one fp16x2 register
  ``XP[p, q] = 2^e_p x``; ``w & mask_p`` leaves bits p and p + 16 in place, which makes each
  fp16 half 0 or ``2 / 2^e_p`` (a subnormal or an exponent bit), so one ``fma.f16x2`` adds
  ``2 x bit`` for two weights: ``lop3 + fma`` per two weights, no unpacking to +-1. With
  ``s x = 2 x bit - x`` the word sum starts from ``-sum x``, computed once per word for all
  rows; the 16 pairs of a word are summed in fp16x2, then in fp32 with the word's scale (the
  tile scale keeps ``|x| <= 2^-10``, see ``X_LIMIT``). Rows that do not start on 16 bytes are
  read as aligned 16-byte blocks and realigned with ``prmt``. The launch configuration is
  measured per shape (:class:`GemvTuner`). Without inline PTX (the interpreter, non-NVIDIA
  targets) the same loop runs in plain Triton with fp32 arithmetic.
* ``int1_gemm`` (prefill / batches): unpacks a ``(BN, BK)`` tile of signs to +-1 in registers and
  feeds ``tl.dot`` with the plain activations.

Legend: ``B`` tokens, ``n`` in_features, ``N`` out_features, ``(n1, n2)`` block shape, ``C =
(n2 / d) D`` columns of ``R``, ``K = n1 C`` lifted width, ``KW = ceil(K / 32)`` packed words per
token, ``RB`` packed bytes per weight row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Optional  # custom_op schemas: Optional[Tensor] parses on torch 2.6+

import torch
from torch import Tensor

from liftquant.kernels.registry import KernelCache

try:  # Triton ships with CUDA builds of torch; a CPU-only install may lack it.
    import triton
    import triton.language as tl
    from triton.runtime.jit import constexpr_function

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    HAS_TRITON = False

# The tile scale keeps |x_scaled| <= X_LIMIT = 2^-10, so the largest pair-layout value
# y_0 = 2^25 x stays <= 2^15 < 65504 (fp16) and 32-term sums stay far from overflow.
X_LIMIT = 2.0**-10
# Words (32 weights) per pair-layout column; fixed by the fp16x2 sign trick.
WORD_BITS = 32


def pair_exponent(p: int) -> int:
    """e_p of the pair layout, ``y_p = 2^e_p x`` (p < 15): ``fp16(bit << p) = bit * 2 / 2^e_p``.

    Bits 0..9 are fp16 mantissa bits (subnormals 2^(p - 24)), bits 10..14 exponent bits
    (2^-14, 2^-13, 2^-11, 2^-7, 2^1).
    """
    return {12: 12, 13: 8, 14: 0}.get(p, 25 - p)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(int(n), 1) - 1).bit_length())


if HAS_TRITON:
    # ---------------------------------------------------------------- fused transform T*
    @triton.jit
    def _transform_kernel(
        X, S1, L, R, S2, OUT, WSC,
        n: tl.constexpr, n1: tl.constexpr, n2: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
        K: tl.constexpr, KW: tl.constexpr,  # shapes are constexpr: one build per layer shape
        N1P: tl.constexpr, N2P: tl.constexpr, CP: tl.constexpr, BR: tl.constexpr,
        BK1: tl.constexpr, CC: tl.constexpr, WT: tl.constexpr, PAIRS: tl.constexpr,
    ):
        rb = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        XDT = X.dtype.element_ty
        rows = rb * BR + tl.arange(0, BR)  # rows i of H
        rmask = rows < n1
        j2 = tl.arange(0, N2P)
        # U = L[rows, :] @ Xs, Xs = pad(x) / s1 viewed (n1, n2)          (BR, N2P)
        U = tl.zeros((BR, N2P), tl.float32)
        for a0 in tl.static_range(0, N1P, BK1):
            a = a0 + tl.arange(0, BK1)
            lt = tl.load(L + rows[:, None] * n1 + a[None, :],
                         mask=rmask[:, None] & (a < n1)[None, :], other=0.0).to(XDT)
            idx = a[:, None] * n2 + j2[None, :]  # (BK1, N2P) flat input index
            m = (a < n1)[:, None] & (j2 < n2)[None, :] & (idx < n)
            xv = tl.load(X + b * n + idx, mask=m, other=0.0)
            s1v = tl.load(S1 + idx, mask=m, other=1.0).to(XDT)  # reference divides in XDT
            U += tl.dot(lt, tl.fdiv(xv.to(tl.float32), s1v.to(tl.float32)).to(XDT))
        Uq = U.to(XDT)
        NB = C // D  # d-chunks per row of the (n1, n2) view: s2_act (n1, NB, 1)
        inv = 1.0
        if PAIRS:  # pass 1: tile max |H| -> power-of-two scale
            amax = 0.0
            for c0 in tl.static_range(0, CP, CC):
                h = _transform_cols(Uq, R, S2, rows, rmask, j2, c0, n2, C, D, NB, CC, XDT)
                amax = tl.maximum(amax, tl.max(tl.max(tl.abs(h), axis=1), axis=0))
            e = tl.ceil(tl.log2(tl.maximum(amax, 1e-30)) + 10.0)  # |x| * 2^-e <= X_LIMIT
            e = tl.minimum(tl.maximum(e, -120.0), 120.0)
            inv = tl.exp2(-e)
            nwords = BR * C // 32  # tiles are word aligned (BR * C % 32 == 0)
            qi = rb * nwords + tl.arange(0, WT)
            tl.store(WSC + b * KW + qi, tl.zeros((WT,), tl.float32) + tl.exp2(e),
                     mask=(tl.arange(0, WT) < nwords) & (qi < KW))
        for c0 in tl.static_range(0, CP, CC):  # pass 2: write
            c = c0 + tl.arange(0, CC)
            h = _transform_cols(Uq, R, S2, rows, rmask, j2, c0, n2, C, D, NB, CC, XDT)
            k = rows[:, None] * C + c[None, :]  # (BR, CC) lifted index
            if PAIRS:  # rows >= n1 are zero: they write the padding of the last word
                q = k // 32
                j = k % 32
                p = j % 16
                # y_p = 2^e_p x for p < 15 (see the GEMV, pair_exponent), y_15 = -x
                ep = tl.where(p == 12, 12, tl.where(p == 13, 8, tl.where(p == 14, 0, 25 - p)))
                f = tl.where(p == 15, -1.0, tl.exp2(ep.to(tl.float32)))
                hw = (b * 16 * KW + p * KW + q) * 2 + j // 16  # fp16 slot in XP
                tl.store(OUT + hw, (h * inv * f).to(tl.float16),
                         mask=(c < C)[None, :] & (k < KW * 32))
            else:
                tl.store(OUT + b * K + k, h.to(XDT), mask=rmask[:, None] & (c < C)[None, :])

    @triton.jit
    def _transform_cols(Uq, R, S2, rows, rmask, j2, c0, n2: tl.constexpr, C: tl.constexpr,
                        D: tl.constexpr, NB: tl.constexpr, CC: tl.constexpr, XDT: tl.constexpr):
        """``(Uq @ R[:, c0:c0+CC]) * s2`` in fp32 with the reference's roundings to XDT."""
        c = c0 + tl.arange(0, CC)
        rt = tl.load(R + j2[:, None] * C + c[None, :],
                     mask=(j2 < n2)[:, None] & (c < C)[None, :], other=0.0).to(XDT)
        h = tl.dot(Uq, rt).to(XDT).to(tl.float32)
        s2 = tl.load(S2 + rows[:, None] * NB + (c // D)[None, :],
                     mask=rmask[:, None] & (c < C)[None, :], other=0.0).to(XDT).to(tl.float32)
        return (h * s2).to(XDT).to(tl.float32)

    # ---------------------------------------------------------------- int1 GEMV (decode)
    # Pair p of a word w (bits p and p + 16): v = w & mask_p keeps the two bits in place, so
    # each fp16 half of v is 0 or a fixed power of two Delta_p (a subnormal for p <= 9, an
    # exponent bit for 10 <= p <= 14); the pair layout stores y_p = 2 x / Delta_p, hence
    # fma(v, y_p, acc) adds 2 x bit: one lop3 + one fma.f16x2 per two weights. The sign bit
    # p = 15 becomes +-1 (v | 1.0) against y_15 = -x. s x = 2 x bit - x, so the word sum starts
    # from -sum_{p<15} x (computed once per word from the y_p and shared by all rows).
    _PAIR_MUL_ASM = tl.constexpr(
        "{ .reg .b32 t; and.b32 t, $1, $2; mul.rn.f16x2 $0, t, $3; }")
    _PAIR_FMA_ASM = tl.constexpr(
        "{ .reg .b32 t; and.b32 t, $1, $2; fma.rn.f16x2 $0, t, $3, $4; }")
    _SIGN_FMA_ASM = tl.constexpr(
        "{ .reg .b32 t; and.b32 t, $1, 0x80008000; or.b32 t, t, 0x3C003C00; "
        "fma.rn.f16x2 $0, t, $2, $3; }")
    _F16X2_MUL_ASM = tl.constexpr("mul.rn.f16x2 $0, $1, $2;")
    _F16X2_FMA_ASM = tl.constexpr("fma.rn.f16x2 $0, $1, $2, $3;")
    # acc - 2^-10 c (c = 2^10 sum x), then lo + hi in fp32.
    _WORD_SUM_ASM = tl.constexpr(
        "{ .reg .b32 t, k; .reg .b16 l, h; .reg .f32 a, b; mov.b32 k, 0x94009400; "
        "fma.rn.f16x2 t, $2, k, $1; mov.b32 {l, h}, t; cvt.f32.f16 a, l; cvt.f32.f16 b, h; "
        "add.f32 $0, a, b; }")

    @constexpr_function
    def _pair_mask(p):
        return (1 << p) | (1 << (p + 16))

    @constexpr_function
    def _corr_bits(p):
        """fp16x2 bits of K_p = 2^(10 - e_p): y_p K_p = 2^10 x (2^-15 is the subnormal 0x0200)."""
        k = 10 - {12: 12, 13: 8, 14: 0}.get(p, 25 - p)  # 10 - pair_exponent(p)
        bits = 0x0200 if k == -15 else (k + 15) << 10
        return bits | (bits << 16)

    @constexpr_function
    def _pair_factor(p):
        """y_p -> x."""
        return -1.0 if p == 15 else 2.0 ** -{12: 12, 13: 8, 14: 0}.get(p, 25 - p)

    @triton.jit
    def _word_dot_asm(w, xp_ptr, qs, qmask, KW):
        acc = w  # placeholder, overwritten at p = 0
        corr = qs  # placeholder, overwritten at p = 0
        for p in tl.static_range(16):
            y = tl.load(xp_ptr + p * KW + qs, mask=qmask, other=0)
            if p < 15:
                mask = _pair_mask(p)
                kb2 = _corr_bits(p)
                if p == 0:
                    acc = tl.inline_asm_elementwise(_PAIR_MUL_ASM, "=r,r,r,r", [w, mask, y[None, :]],
                                                    dtype=tl.int32, is_pure=True, pack=1)
                    corr = tl.inline_asm_elementwise(_F16X2_MUL_ASM, "=r,r,r", [y, kb2],
                                                     dtype=tl.int32, is_pure=True, pack=1)
                else:
                    acc = tl.inline_asm_elementwise(_PAIR_FMA_ASM, "=r,r,r,r,r",
                                                    [w, mask, y[None, :], acc],
                                                    dtype=tl.int32, is_pure=True, pack=1)
                    corr = tl.inline_asm_elementwise(_F16X2_FMA_ASM, "=r,r,r,r", [y, kb2, corr],
                                                     dtype=tl.int32, is_pure=True, pack=1)
            else:
                acc = tl.inline_asm_elementwise(_SIGN_FMA_ASM, "=r,r,r,r", [w, y[None, :], acc],
                                                dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(_WORD_SUM_ASM, "=f,r,r", [acc, corr[None, :]],
                                         dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _half(bits):
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _word_dot_ref(w, xp_ptr, qs, qmask, KW):
        """Same sum in plain Triton with fp32 arithmetic (interpreter, non-NVIDIA targets)."""
        part = tl.zeros(w.shape, tl.float32)
        for p in tl.static_range(16):
            y = tl.load(xp_ptr + p * KW + qs, mask=qmask, other=0)
            f = _pair_factor(p)
            lo = _half(y & 0xFFFF) * f
            hi = _half((y >> 16) & 0xFFFF) * f
            part += tl.where(((w >> p) & 1) != 0, lo[None, :], -lo[None, :])
            part += tl.where(((w >> (p + 16)) & 1) != 0, hi[None, :], -hi[None, :])
        return part

    @triton.jit
    def _quad(A, BN: tl.constexpr, BW: tl.constexpr):
        """(BN, BW) -> the 4 words each thread holds, as 4 tensors (BN, BW / 4)."""
        lo, hi = tl.split(tl.reshape(A, (BN, BW // 4, 2, 2)))  # word 4t + 2 i1 + i0
        a0, a2 = tl.split(lo)
        a1, a3 = tl.split(hi)
        return a0, a1, a2, a3

    @triton.jit
    def _pick(d, x0, x1, x2, x3):
        return tl.where(d == 0, x0, tl.where(d == 1, x1, tl.where(d == 2, x2, x3)))

    @triton.jit
    def _funnel(lo, hi, sigma, USE_ASM: tl.constexpr):
        """Bytes sigma .. sigma + 3 of the 8-byte value hi:lo."""
        if USE_ASM:
            sel = 0x3210 + sigma * 0x1111
            w = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [lo, hi, sel],
                                          dtype=tl.int32, is_pure=True, pack=1)
        else:
            lo64 = lo.to(tl.uint32, bitcast=True).to(tl.uint64)
            hi64 = hi.to(tl.uint32, bitcast=True).to(tl.uint64)
            w = (((hi64 << 32) | lo64) >> (sigma * 8).to(tl.uint64)).to(tl.uint32)
            w = w.to(tl.int32, bitcast=True)
        return w

    @triton.jit
    def _load_words(W, wrow, base, beta, rmask, qs, KW, NWT, ALIGNED: tl.constexpr,
                    USE_ASM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
        """Packed words [qs] of each row as (BN, BW) int32 (16-byte loads in both cases)."""
        if ALIGNED:
            w = tl.load(wrow + qs[None, :], mask=rmask[:, None] & (qs < KW)[None, :], other=0)
        else:  # row = bytes beta.. of the 16-byte block at word base: load 8 words, realign
            # Physical words up to qs + 4 feed logical word qs: mask by the buffer end only
            # (bits past a row's end meet zero activations).
            wi = base[:, None] + qs[None, :]
            A = tl.load(W + wi, mask=rmask[:, None] & (wi < NWT), other=0)
            B = tl.load(W + wi + 4, mask=rmask[:, None] & (wi + 4 < NWT), other=0)
            a0, a1, a2, a3 = _quad(A, BN, BW)
            b0, b1, b2, b3 = _quad(B, BN, BW)
            d = (beta // 4)[:, None]  # word shift 0..3
            sig = (beta % 4)[:, None]  # byte shift 0..3
            v0 = _pick(d, a0, a1, a2, a3)
            v1 = _pick(d, a1, a2, a3, b0)
            v2 = _pick(d, a2, a3, b0, b1)
            v3 = _pick(d, a3, b0, b1, b2)
            v4 = _pick(d, b0, b1, b2, b3)
            o0 = _funnel(v0, v1, sig, USE_ASM)
            o1 = _funnel(v1, v2, sig, USE_ASM)
            o2 = _funnel(v2, v3, sig, USE_ASM)
            o3 = _funnel(v3, v4, sig, USE_ASM)
            w = tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), (BN, BW))
        return w

    @triton.jit
    def _gemv_body(W, XP, XSC, SCALE, BIAS, OUT, N, KW, RS, NWT,
                   HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr, USE_ASM: tl.constexpr,
                   BN: tl.constexpr, BW: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rows = pid * BN + tl.arange(0, BN)
        rmask = rows < N
        xp_ptr = XP + b * 16 * KW
        if ALIGNED:  # RS = words per row (rows start on 16-byte boundaries)
            wrow = W + rows.to(tl.int64)[:, None] * RS
            base = rows  # unused
            beta = rows  # unused
        else:  # RS = bytes per row; a row starts at byte beta of the 16-byte block `base`
            wrow = W  # unused
            rbyte = rows.to(tl.int64) * RS
            base = (rbyte // 16) * 4
            beta = (rbyte % 16).to(tl.int32)
        acc = tl.zeros((BN, BW), tl.float32)
        w_next = _load_words(W, wrow, base, beta, rmask, tl.arange(0, BW), KW, NWT, ALIGNED,
                             USE_ASM, BN, BW)
        for q0 in range(0, KW, BW):
            w = w_next  # software pipelining: the next step's weights load during this one
            w_next = _load_words(W, wrow, base, beta, rmask, q0 + BW + tl.arange(0, BW), KW,
                                 NWT, ALIGNED, USE_ASM, BN, BW)
            qs = q0 + tl.arange(0, BW)
            qmask = qs < KW
            xsc = tl.load(XSC + b * KW + qs, mask=qmask, other=0.0)
            if USE_ASM:
                part = _word_dot_asm(w, xp_ptr, qs, qmask, KW)
            else:
                part = _word_dot_ref(w, xp_ptr, qs, qmask, KW)
            acc += part * xsc[None, :]
        out = tl.sum(acc, axis=1) * tl.load(SCALE + rows, mask=rmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            out += tl.load(BIAS + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(OUT + b * N + rows, out.to(OUT.dtype.element_ty), mask=rmask)

    @triton.jit
    def _gemv_kernel(W, XP, XSC, SCALE, BIAS, OUT, N, KW, RS, NWT,
                     HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr, USE_ASM: tl.constexpr,
                     BN: tl.constexpr, BW: tl.constexpr):
        _gemv_body(W, XP, XSC, SCALE, BIAS, OUT, N, KW, RS, NWT,
                   HAS_BIAS, ALIGNED, USE_ASM, BN, BW)

    @triton.jit
    def _gemv_kernel_interp(W, XP, XSC, SCALE, BIAS, OUT, N, KW: tl.constexpr, RS, NWT,
                            HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr,
                            USE_ASM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
        # The interpreter (numpy 2) needs constexpr loop bounds; same body otherwise.
        _gemv_body(W, XP, XSC, SCALE, BIAS, OUT, N, KW, RS, NWT,
                   HAS_BIAS, ALIGNED, USE_ASM, BN, BW)

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
class GemvConfig:
    block_n: int  # weight rows per program
    block_w: int  # packed 32-bit words per row per loop step (4 per thread: 16-byte loads)
    num_warps: int
    use_asm: bool = True


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int


# GEMV launch candidates (block_n, num_warps), block_w = 128 * num_warps: warps side by side
# along K and 4 words per thread, so the pair-layout activations load straight into the
# threads that use them (no shared-memory shuffle). Unaligned rows hold 8 words per step and
# spill registers beyond 4 rows.
GEMV_CANDIDATES = ((2, 1), (4, 1), (8, 1), (4, 2), (8, 2), (4, 4), (8, 4))
UNALIGNED_MAX_BLOCK_N = 4
# Set LIFTQUANT_TUNE=0 to skip measuring the candidates (the heuristic is used instead).
TUNE_ENV = "LIFTQUANT_TUNE"


def pick_gemv_config(N: int, KW: int, n_sm: int, *, aligned: bool = True) -> GemvConfig:
    """Heuristic when not tuning: 2 rows x 128 words per one-warp program was the fastest
    candidate for 20 of the 24 Llama-3 8B/70B shapes x lattices on an H100 (bench/kernels.md);
    4-row tiles only pay off when 2-row tiles would leave SMs with too many tiny programs."""
    del KW, aligned  # kept for callers that pass the full problem description
    block_n = 4 if -(-N // 2) > 128 * n_sm else 2
    return GemvConfig(block_n, 128, 1)


def pick_gemm_config(B: int, N: int) -> GemmConfig:
    if B <= 16:
        return GemmConfig(16, 64, 128, 4)
    if B <= 64:
        return GemmConfig(64, 64, 64, 4)
    return GemmConfig(128, 128, 64, 8)


class GemvTuner:
    """GEMV launch configuration per problem shape, measured once (like ``triton.autotune``).

    On first use of a (rows, words, alignment, dtype, device) shape outside CUDA-graph capture,
    every candidate is timed with ``triton.testing.do_bench`` (L2 cleared per run) and the
    fastest is kept in a :class:`~liftquant.kernels.registry.KernelCache`. During capture, in
    the interpreter, or with ``LIFTQUANT_TUNE=0`` the heuristic is used.
    """

    def __init__(self) -> None:
        self.cache = KernelCache("triton-gemv")
        self.timings: dict = {}

    def config(self, launch, *, N: int, KW: int, aligned: bool, key: tuple,
               use_asm: bool) -> GemvConfig:
        full_key = (*key, use_asm)
        cfg = self.cache.lookup(full_key)
        if cfg is not None:
            return cfg
        n_sm = 132
        if torch.cuda.is_available() and not interpreting():
            n_sm = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        fallback = dataclasses.replace(pick_gemv_config(N, KW, n_sm, aligned=aligned),
                                       use_asm=use_asm)
        if interpreting() or os.environ.get(TUNE_ENV, "1") == "0":
            return self.cache.get(full_key, lambda: fallback)
        if torch.cuda.is_current_stream_capturing():
            return fallback  # no timing inside a graph capture; tune on the next eager call
        return self.cache.get(full_key, lambda: self._measure(launch, full_key, aligned,
                                                              use_asm))

    def _measure(self, launch, key: tuple, aligned: bool, use_asm: bool) -> GemvConfig:
        from triton.testing import do_bench

        times, errors = {}, []
        for block_n, num_warps in GEMV_CANDIDATES:
            if not aligned and block_n > UNALIGNED_MAX_BLOCK_N:
                continue
            cfg = GemvConfig(block_n, 128 * num_warps, num_warps, use_asm)
            try:
                times[cfg] = do_bench(lambda c=cfg: launch(c), warmup=5, rep=20,
                                      return_mode="median")
            except Exception as err:  # noqa: BLE001 - a candidate that does not build
                errors.append(err)
        if not times:
            raise errors[0]
        self.timings[key] = {(c.block_n, c.num_warps): t * 1e3 for c, t in times.items()}
        return min(times, key=times.get)


# -------------------------------------------------------------------- launch helpers
def transform_tile_rows(C: int) -> int:
    """Rows of H per transform program: tiles must hold whole 32-weight words."""
    return 16 if (16 * C) % WORD_BITS == 0 else 32


def _check_triton(t: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("Triton is not importable; use the 'torch' backend")
    if not (t.is_cuda or interpreting()):
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


def _device_ctx(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def launch_transform(x: Tensor, s1: Tensor, L: Tensor, R: Tensor, s2_act: Tensor, *,
                     d: int, D: int, pairs: bool) -> tuple[Tensor, Tensor]:
    """``T*(x)`` for ``x`` (B, n): pairs -> (XP int32 (B, 16, KW), word scales (B, KW) fp32),
    plain -> ((B, K) in x.dtype, empty)."""
    _check_triton(x)
    B, n = x.shape
    n1, n2, C = L.shape[0], R.shape[0], R.shape[1]
    K = n1 * C
    KW = -(-K // WORD_BITS)
    BR = transform_tile_rows(C)
    N1P, N2P = _pow2(n1), _pow2(n2)
    CC = 64 if C > 32 else 32
    CP = -(-C // CC) * CC
    BK1 = min(N1P, 64)
    WT = _pow2(BR * CP // WORD_BITS, floor=1)
    if pairs:
        out = torch.empty(B, 16, 2 * KW, device=x.device, dtype=torch.float16)
        wsc = torch.empty(B, KW, device=x.device, dtype=torch.float32)
    else:
        out = torch.empty(B, K, device=x.device, dtype=x.dtype)
        wsc = torch.empty(B, 0, device=x.device, dtype=torch.float32)
    grid = (-(-n1 // BR), B)
    num_warps = 8 if max(N1P, N2P) >= 128 else 4
    with _device_ctx(x):
        _transform_kernel[grid](
            x.contiguous(), s1, L, R, s2_act, out, wsc, n=n, n1=n1, n2=n2, C=C, D=D, K=K, KW=KW,
            N1P=N1P, N2P=N2P, CP=CP, BR=BR, BK1=BK1, CC=CC, WT=WT, PAIRS=pairs,
            num_warps=num_warps)
    return (out.view(torch.int32), wsc) if pairs else (out, wsc)


def _word_view(packed: Tensor) -> tuple[Tensor, bool, int, int]:
    """int32 words of ``packed`` (N, RB): (words, aligned, row stride, total words)."""
    N, RB = packed.shape
    packed = packed.contiguous()
    if RB % 16 == 0 and packed.data_ptr() % 16 == 0:
        return packed.view(torch.int32), True, RB // 4, N * RB // 4
    # Unaligned rows: the kernel reads 16-byte blocks and realigns them; a total size that is
    # a multiple of 64 bytes keeps its bounds mask 16-byte uniform (vector loads). LLM shapes
    # already are; odd shapes get one padded copy per call.
    flat = packed.reshape(-1)
    if flat.numel() % 64 or packed.data_ptr() % 16:
        flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 64))
    return flat.view(torch.int32), False, RB, flat.numel() // 4


def launch_gemv(xp: Tensor, wsc: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None,
                out_dtype: torch.dtype, *, block_n: int, block_w: int = 128, num_warps: int = 4,
                use_asm: bool = True) -> Tensor:
    """``out[b] = scale * (Y @ x_b) + bias`` from the pair layout (one program per BN rows)."""
    _check_triton(xp)
    B, _, KW = xp.shape
    N = packed.shape[0]
    words, aligned, rs, nwt = _word_view(packed)
    out = torch.empty(B, N, device=xp.device, dtype=out_dtype)
    kernel = _gemv_kernel_interp if interpreting() else _gemv_kernel
    grid = (-(-N // block_n), B)
    with _device_ctx(xp):
        kernel[grid](words, xp, wsc, scale, bias if bias is not None else scale, out,
                     N, KW, rs, nwt, HAS_BIAS=bias is not None, ALIGNED=aligned,
                     USE_ASM=use_asm and not interpreting(), BN=block_n, BW=block_w,
                     num_warps=num_warps)
    return out


def launch_gemm(xs: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None, *,
                block_m: int, block_n: int = 64, block_k: int = 64,
                num_warps: int = 4) -> Tensor:
    """``out = scale * (xs @ Y^T) + bias`` for ``xs`` (B, K) with ``Y`` unpacked per tile."""
    _check_triton(xs)
    B, K = xs.shape
    N, RB = packed.shape
    out = torch.empty(B, N, device=xs.device, dtype=xs.dtype)
    kernel = _gemm_kernel_interp if interpreting() else _gemm_kernel
    grid = (-(-B // block_m), -(-N // block_n))
    with _device_ctx(xs):
        kernel[grid](xs.contiguous(), packed.contiguous(), scale,
                     bias if bias is not None else scale, out, B, N, K, RB,
                     HAS_BIAS=bias is not None, BM=block_m, BN=block_n, BK=block_k,
                     num_warps=num_warps)
    return out


# -------------------------------------------------------------------- custom ops
_ASM_STATUS: dict[str, str] = {}  # "failed" -> reason, once the inline-PTX GEMV failed to build


@torch.library.custom_op("liftquant::fused_transform", mutates_args=())
def fused_transform(x: Tensor, s1: Tensor, L: Tensor, R: Tensor, s2_act: Tensor, d: int, D: int,
                    pairs: bool) -> tuple[Tensor, Tensor]:
    """Fused ``T*(x)`` (Eq. 4) for ``x`` (B, n); see :func:`launch_transform`."""
    return launch_transform(x, s1, L, R, s2_act, d=d, D=D, pairs=pairs)


@fused_transform.register_fake
def _(x, s1, L, R, s2_act, d, D, pairs):
    B, K = x.shape[0], L.shape[0] * R.shape[1]
    KW = -(-K // WORD_BITS)
    if pairs:
        return x.new_empty(B, 16, KW, dtype=torch.int32), x.new_empty(B, KW, dtype=torch.float32)
    return x.new_empty(B, K), x.new_empty(B, 0, dtype=torch.float32)


@torch.library.custom_op("liftquant::int1_gemv", mutates_args=())
def int1_gemv(xp: Tensor, wsc: Tensor, packed: Tensor, scale: Tensor, bias: Optional[Tensor],  # noqa: UP045
              out_dtype: torch.dtype) -> Tensor:
    """Decode GEMV from the pair layout with the tuned configuration for this shape; falls back
    to the plain-Triton loop (once, with a warning) when the inline-PTX variant cannot be built."""
    N, KW = packed.shape[0], xp.shape[-1]
    aligned = packed.shape[1] % 16 == 0
    key = (N, KW, aligned, out_dtype, bias is not None, xp.device.index)

    def run(use_asm: bool) -> Tensor:
        def launch(cfg: GemvConfig) -> Tensor:
            return launch_gemv(xp, wsc, packed, scale, bias, out_dtype, block_n=cfg.block_n,
                               block_w=cfg.block_w, num_warps=cfg.num_warps,
                               use_asm=cfg.use_asm)

        return launch(GEMV_TUNER.config(launch, N=N, KW=KW, aligned=aligned, key=key,
                                        use_asm=use_asm))

    if "failed" not in _ASM_STATUS:
        try:
            return run(True)
        except Exception as err:  # noqa: BLE001 - compiler / PTX assembler failure
            import warnings

            _ASM_STATUS["failed"] = f"{type(err).__name__}: {err}"[:500]
            warnings.warn("liftquant: inline-PTX int1 GEMV unavailable, using the plain Triton "
                          f"loop ({_ASM_STATUS['failed']})", RuntimeWarning, stacklevel=2)
    return run(False)


@int1_gemv.register_fake
def _(xp, wsc, packed, scale, bias, out_dtype):
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


GEMV_TUNER = GemvTuner()
