"""Building blocks shared by the int1 kernels: the pair layout, packed-word loads, launch checks.

Packed signs are 32-bit words ``w``; word ``q`` of a row holds signs ``k = 32q .. 32q + 31``
(LSB first, ``pack.py``). The GEMVs read activations in the *pair layout*: pair ``p`` of word
``q`` (signs ``32q + p`` and ``32q + p + 16``) is one fp16x2 register ``XP[p, q] = 2^e_p x``.
``w & mask_p`` keeps bits p and p + 16 in place, which makes each fp16 half 0 or
``Delta_p = 2 / 2^e_p`` (a subnormal for p <= 9, an exponent bit for 10 <= p <= 14), so
``fma.f16x2(w & mask_p, y_p, acc)`` adds ``2 x bit`` for two weights. The sign bit p = 15 is
stored as ``y_15 = -x`` and turned into ``+-1`` instead. Each word has a power-of-two scale
(one per transform tile, ``X_LIMIT``).

Rows of packed bytes that do not start on 16 bytes are read as aligned 16-byte blocks and
realigned in registers (:func:`_load_words`), so every weight load is a 16-byte vector load.

**Programmatic dependent launch** (Hopper and later; decided by the planner, ``policy.plan``,
and passed to each launch as ``pdl``): the decode kernels are launched with ``launch_pdl`` and
may start while the previous kernel still runs. Each one loads what no earlier kernel writes
(packed signs, transform factors) first, then waits (``griddepcontrol.wait``, :func:`grid_wait`)
before it reads activations or writes anything; ``fused_transform`` lets its GEMV launch as soon
as it starts (:func:`grid_launch_dependents`). A decode step is a chain of short latency-bound
kernels, so the next kernel's launch and weight loads hide under the current one.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from liftquant.kernels.policy import interpreting

try:  # Triton ships with CUDA builds of torch; a CPU-only install may lack it.
    import triton
    import triton.language as tl
    from triton.runtime.jit import constexpr_function

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    HAS_TRITON = False


def pdl_launch(pdl: bool) -> dict:
    """Launch keywords of a kernel with a ``PDL`` constexpr: the flag, and Triton's
    ``launch_pdl`` option when it is on."""
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


# The tile scale keeps |x_scaled| <= X_LIMIT = 2^-10, so the largest pair-layout value
# y_0 = 2^25 x stays <= 2^15 < 65504 (fp16) and 32-term sums stay far from overflow.
X_LIMIT = 2.0**-10
# Weights per packed 32-bit word; also the pair-layout column width (16 fp16x2 pairs).
WORD_BITS = 32


def pair_exponent(p: int) -> int:
    """e_p of the pair layout, ``y_p = 2^e_p x`` (p < 15): ``fp16(bit << p) = bit * 2 / 2^e_p``.

    Bits 0..9 are fp16 mantissa bits (subnormals 2^(p - 24)), bits 10..14 exponent bits
    (2^-14, 2^-13, 2^-11, 2^-7, 2^1).
    """
    return {12: 12, 13: 8, 14: 0}.get(p, 25 - p)  # exponent bits 12..14; the rest 25 - p


def check_triton(t: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("Triton is not importable; use the 'torch' backend")
    if not (t.is_cuda or interpreting()):
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


def device_ctx(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def word_view(packed: Tensor) -> tuple[Tensor, bool, int, int]:
    """int32 words of ``packed`` (N, RB): (words, aligned, row stride, total words).

    Aligned rows (RB % 16 == 0): the stride is in words. Otherwise it is in bytes and the
    kernels realign 16-byte blocks; a total size that is a multiple of 64 bytes keeps their
    bounds mask 16-byte uniform (vector loads). LLM shapes already are; odd shapes get one
    padded copy per call.
    """
    N, RB = packed.shape
    packed = packed.contiguous()
    if RB % 16 == 0 and packed.data_ptr() % 16 == 0:
        return packed.view(torch.int32), True, RB // 4, N * RB // 4
    flat = packed.reshape(-1)
    if flat.numel() % 64 or packed.data_ptr() % 16:
        flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 64))
    return flat.view(torch.int32), False, RB, flat.numel() // 4


if HAS_TRITON:

    @triton.jit
    def grid_wait(PDL: tl.constexpr):
        """Wait until the kernels this one depends on have finished and their writes are
        visible (``griddepcontrol.wait``; a no-op when launched without PDL)."""
        if PDL:
            tl.inline_asm_elementwise("griddepcontrol.wait; mov.b32 $0, 0;", "=r", [],
                                      dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def grid_launch_dependents(PDL: tl.constexpr):
        """Let the next kernel (launched with PDL) start now; it still waits for this one's
        writes in :func:`grid_wait`."""
        if PDL:
            tl.inline_asm_elementwise("griddepcontrol.launch_dependents; mov.b32 $0, 0;", "=r",
                                      [], dtype=tl.int32, is_pure=False, pack=1)

    # One pair of the v2 word loop: acc (+)= (w & mask_p) * y_p in fp16x2 (lop3 + fma.f16x2).
    PAIR_MUL_ASM = tl.constexpr(
        "{ .reg .b32 t; and.b32 t, $1, $2; mul.rn.f16x2 $0, t, $3; }")
    PAIR_FMA_ASM = tl.constexpr(
        "{ .reg .b32 t; and.b32 t, $1, $2; fma.rn.f16x2 $0, t, $3, $4; }")
    # The sign pair p = 15: (w & 0x80008000) | 1.0 is +-1 per half, against y_15 = -x.
    SIGN_FMA_ASM = tl.constexpr(
        "{ .reg .b32 t; and.b32 t, $1, 0x80008000; or.b32 t, t, 0x3C003C00; "
        "fma.rn.f16x2 $0, t, $2, $3; }")

    @constexpr_function
    def pair_mask(p):
        """Bits p and p + 16 of a word: pair p of the pair layout."""
        return (1 << p) | (1 << (p + 16))

    @constexpr_function
    def pair_factor(p):
        """y_p -> x (2^-e_p, and -1 for the sign pair p = 15)."""
        return -1.0 if p == 15 else 2.0 ** -{12: 12, 13: 8, 14: 0}.get(p, 25 - p)

    @triton.jit
    def half_to_f32(bits):
        """fp16 bit pattern in the low 16 bits of an int32 -> its value in fp32."""
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

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
    def realign_words(W, base, beta, rmask, qs, NWT, USE_ASM: tl.constexpr, BN: tl.constexpr,
                      BW: tl.constexpr):
        """Logical words [qs] of rows that start at byte ``beta`` of the 16-byte block at word
        ``base``, as (BN, BW) int32: two aligned 16-byte loads per 4 words, then realigned.

        Physical words up to qs + 4 feed logical word qs: the mask is the buffer end only
        (bits past a row's end meet zero activations).
        """
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
        return tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), (BN, BW))
