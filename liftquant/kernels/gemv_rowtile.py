"""The row-tile int1 GEMV (decode v2, measured in bench/kernels/README.md): one program per ``BN`` rows.

Each program walks the whole K range of its rows, ``BW`` words per step (4 words per thread,
warps side by side along K), and reloads the pair-layout activations at every step: 16 x 4
bytes of activations per weight word, shared only by the ``BN`` rows of the tile. Per pair it
runs ``lop3 + fma.f16x2`` (see ``int1_words``); the per-word correction ``-sum x`` is computed
once per word for all rows. Weights are prefetched one step ahead in registers.

It is kept as the fallback and as tuner candidates next to the split-K row stream
(``gemv_splitk``); it needs no workspace and was validated on an H100.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from liftquant.kernels.int1_words import (
    HAS_TRITON,
    check_triton,
    device_ctx,
    interpreting,
    pdl_launch,
    word_view,
)

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.runtime.jit import constexpr_function

    from liftquant.kernels.int1_words import (
        PAIR_FMA_ASM,
        PAIR_MUL_ASM,
        SIGN_FMA_ASM,
        grid_wait,
        half_to_f32,
        pair_factor,
        pair_mask,
        realign_words,
    )

    _F16X2_MUL_ASM = tl.constexpr("mul.rn.f16x2 $0, $1, $2;")
    _F16X2_FMA_ASM = tl.constexpr("fma.rn.f16x2 $0, $1, $2, $3;")
    # acc - 2^-10 c (c = 2^10 sum x), then lo + hi in fp32.
    _WORD_SUM_ASM = tl.constexpr(
        "{ .reg .b32 t, k; .reg .b16 l, h; .reg .f32 a, b; mov.b32 k, 0x94009400; "
        "fma.rn.f16x2 t, $2, k, $1; mov.b32 {l, h}, t; cvt.f32.f16 a, l; cvt.f32.f16 b, h; "
        "add.f32 $0, a, b; }")

    @constexpr_function
    def _corr_bits(p):
        """fp16x2 bits of K_p = 2^(10 - e_p): y_p K_p = 2^10 x (2^-15 is the subnormal 0x0200)."""
        k = 10 - {12: 12, 13: 8, 14: 0}.get(p, 25 - p)  # 10 - pair_exponent(p)
        bits = 0x0200 if k == -15 else (k + 15) << 10
        return bits | (bits << 16)

    @triton.jit
    def _word_dot_asm(w, xp_ptr, qs, qmask, KW):
        acc = w  # placeholder, overwritten at p = 0
        corr = qs  # placeholder, overwritten at p = 0
        for p in tl.static_range(16):
            y = tl.load(xp_ptr + p * KW + qs, mask=qmask, other=0)
            if p < 15:
                mask = pair_mask(p)
                kb2 = _corr_bits(p)
                if p == 0:
                    acc = tl.inline_asm_elementwise(PAIR_MUL_ASM, "=r,r,r,r", [w, mask, y[None, :]],
                                                    dtype=tl.int32, is_pure=True, pack=1)
                    corr = tl.inline_asm_elementwise(_F16X2_MUL_ASM, "=r,r,r", [y, kb2],
                                                     dtype=tl.int32, is_pure=True, pack=1)
                else:
                    acc = tl.inline_asm_elementwise(PAIR_FMA_ASM, "=r,r,r,r,r",
                                                    [w, mask, y[None, :], acc],
                                                    dtype=tl.int32, is_pure=True, pack=1)
                    corr = tl.inline_asm_elementwise(_F16X2_FMA_ASM, "=r,r,r,r", [y, kb2, corr],
                                                     dtype=tl.int32, is_pure=True, pack=1)
            else:
                acc = tl.inline_asm_elementwise(SIGN_FMA_ASM, "=r,r,r,r", [w, y[None, :], acc],
                                                dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(_WORD_SUM_ASM, "=f,r,r", [acc, corr[None, :]],
                                         dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _word_dot_ref(w, xp_ptr, qs, qmask, KW):
        """Same sum in plain Triton with fp32 arithmetic (interpreter, non-NVIDIA targets)."""
        part = tl.zeros(w.shape, tl.float32)
        for p in tl.static_range(16):
            y = tl.load(xp_ptr + p * KW + qs, mask=qmask, other=0)
            f = pair_factor(p)
            lo = half_to_f32(y & 0xFFFF) * f
            hi = half_to_f32((y >> 16) & 0xFFFF) * f
            part += tl.where(((w >> p) & 1) != 0, lo[None, :], -lo[None, :])
            part += tl.where(((w >> (p + 16)) & 1) != 0, hi[None, :], -hi[None, :])
        return part

    @triton.jit
    def _load_words(W, wrow, base, beta, rmask, qs, KW, NWT, ALIGNED: tl.constexpr,
                    USE_ASM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
        """Packed words [qs] of each row as (BN, BW) int32 (16-byte loads in both cases)."""
        if ALIGNED:
            w = tl.load(wrow + qs[None, :], mask=rmask[:, None] & (qs < KW)[None, :], other=0)
        else:
            w = realign_words(W, base, beta, rmask, qs, NWT, USE_ASM, BN, BW)
        return w

    @triton.jit
    def _gemv_body(W, XP, XSC, SCALE, BIAS, OUT, N, KW, RS, NWT,
                   HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr, USE_ASM: tl.constexpr,
                   BN: tl.constexpr, BW: tl.constexpr, PDL: tl.constexpr):
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
        grid_wait(PDL)  # activations next: with PDL their writer may run until here
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
                     BN: tl.constexpr, BW: tl.constexpr, PDL: tl.constexpr):
        _gemv_body(W, XP, XSC, SCALE, BIAS, OUT, N, KW, RS, NWT,
                   HAS_BIAS, ALIGNED, USE_ASM, BN, BW, PDL)

    @triton.jit
    def _gemv_kernel_interp(W, XP, XSC, SCALE, BIAS, OUT, N, KW: tl.constexpr, RS, NWT,
                            HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr,
                            USE_ASM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr,
                            PDL: tl.constexpr):
        # The interpreter (numpy 2) needs constexpr loop bounds; same body otherwise.
        _gemv_body(W, XP, XSC, SCALE, BIAS, OUT, N, KW, RS, NWT,
                   HAS_BIAS, ALIGNED, USE_ASM, BN, BW, PDL)


@dataclass(frozen=True)
class GemvConfig:
    """Launch configuration of the row-tile GEMV."""

    block_n: int  # weight rows per program
    block_w: int  # packed 32-bit words per row per loop step (4 per thread: 16-byte loads)
    num_warps: int
    use_asm: bool = True

    @property
    def label(self) -> str:
        return f"rowtile:{self.block_n}x{self.num_warps}" + ("" if self.use_asm else ":noasm")


# Launch candidates (block_n, num_warps), block_w = 128 * num_warps: warps side by side along
# K and 4 words per thread, so the activations load straight into the threads that use them.
# Unaligned rows hold 8 words per step and spill registers beyond 4 rows.
GEMV_CANDIDATES = ((2, 1), (4, 1), (8, 1), (4, 2), (8, 2), (4, 4), (8, 4))
# The subset the runtime tuner times: the fastest v2 tiles of bench/kernels/README.md (2x1 won most
# shapes; 4x1 and 4x2 the rest).
TUNER_CANDIDATES = ((2, 1), (4, 1), (4, 2))
UNALIGNED_MAX_BLOCK_N = 4


def pick_gemv_config(N: int, KW: int, n_sm: int, *, aligned: bool = True) -> GemvConfig:
    """2 rows x 128 words per one-warp program was the fastest candidate for most of the
    Llama-3 8B/70B shapes x lattices on an H100 (bench/kernels/README.md); 4-row tiles only pay off
    when 2-row tiles would leave SMs with too many tiny programs."""
    del KW, aligned  # kept for callers that pass the full problem description
    block_n = 4 if -(-N // 2) > 128 * n_sm else 2
    return GemvConfig(block_n, 128, 1)


def rowtile_candidates(*, aligned: bool, use_asm: bool) -> list[GemvConfig]:
    return [GemvConfig(bn, 128 * nw, nw, use_asm) for bn, nw in TUNER_CANDIDATES
            if aligned or bn <= UNALIGNED_MAX_BLOCK_N]


def launch_gemv(xp: Tensor, wsc: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None,
                out_dtype: torch.dtype, *, block_n: int, block_w: int = 128, num_warps: int = 4,
                use_asm: bool = True, pdl: bool = False) -> Tensor:
    """``out[b] = scale * (Y @ x_b) + bias`` from the pair layout (one program per BN rows);
    ``pdl``: launch with programmatic dependent launch (the planner's decision)."""
    check_triton(xp)
    B, _, KW = xp.shape
    N = packed.shape[0]
    words, aligned, rs, nwt = word_view(packed)
    out = torch.empty(B, N, device=xp.device, dtype=out_dtype)
    kernel = _gemv_kernel_interp if interpreting() else _gemv_kernel
    grid = (-(-N // block_n), B)
    with device_ctx(xp):
        kernel[grid](words, xp, wsc, scale, bias if bias is not None else scale, out,
                     N, KW, rs, nwt, HAS_BIAS=bias is not None, ALIGNED=aligned,
                     USE_ASM=use_asm and not interpreting(), BN=block_n, BW=block_w,
                     num_warps=num_warps, **pdl_launch(pdl))
    return out
