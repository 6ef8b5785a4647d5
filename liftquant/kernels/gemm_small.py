"""Split-K int1 GEMM for a few tokens (decode at batch 2-16): tensor cores, weights read once.

``out = scale * (xs @ Y^T) + bias`` for ``xs`` (B, K) plain lifted activations (``T*(x)``) and
``Y`` the (N, K) +-1 matrix of the packed signs (``pack.py``: word ``q`` of a row holds signs
``32q .. 32q + 31``, LSB first, bit 1 = +1).

At batch 1 the decode GEMV streams the signs through fp16x2 FMAs (``gemv_splitk``); with B
tokens that costs B times the FMAs, while the weight bytes stay the same. Here each program
expands a ``(BN, BK)`` tile of signs into +-1 halves in registers (integer ops on the bit
pattern, no int to float conversion) and feeds ``tl.dot`` with the ``(BM, BK)`` activation
tile, so the per-sign cost is a few integer ops shared by every token and the multiply-adds run
on tensor cores.

* **Grid** ``(ceil(N / BN), S)``: program ``(g, s)`` owns rows ``g`` and K-slice ``s`` (a
  multiple of ``BK``). With few rows (``k_proj``/``v_proj`` of a GQA model) the split ``S``
  keeps every SM streaming; ``S == 1`` writes the output directly.
* **Reduction** (``S > 1``): fp32 partials ``(S, B, N)``, then one small kernel sums them in
  slice order (deterministic), applies scale and bias and casts.
* **Operand order** (``swap``): ``dot(Y, xs^T)`` puts the weight rows on the MMA's M side
  (Hopper's wgmma takes that operand from registers, where the signs are expanded), ``dot(xs,
  Y^T)`` the tokens. With the tokens on M, ``block_m = 64`` pads them to one wgmma tile: both
  operands then come from shared memory and the sm_90 build waits once per K step instead of
  once per MMA (4x the MMA work, on tensor cores that are nearly idle here). Not yet timed on
  a GPU (the sweep lists it; the planner's configurations are 16-row).
* **Sign expansion** (``pairs``): per word, 16 pairs of signs (bits p and p + 16) each become
  two +-1 halves with one shift and one ``lop3`` (about one instruction per sign), or bit by
  bit (shift, and, xor, shift, or: about three).

* **Rows** whose packed bytes are a multiple of 4 (on an aligned base) load as int32 words;
  others (e.g. 24to10 at in_features 4096: 1230-byte rows) load bytes and assemble the words.

The launch configuration comes from :func:`pick_config` (two measured settings, by row form);
``scripts/bench_gemm_small.py`` measures the candidates per shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional  # custom_op schemas: Optional[Tensor] parses on torch 2.6+

import torch
from torch import Tensor

from liftquant.kernels.int1_words import HAS_TRITON, check_triton, device_ctx, interpreting

# Most tokens this kernel is for (one MMA tile of 16 tokens); larger batches use the GEMM.
MAX_TOKENS = 16
# Programs per SM the split aims for.
PROGRAMS_PER_SM = 2

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _signs(w, sh, ONE: tl.constexpr, XDT: tl.constexpr):
        """+-1 in ``XDT`` from bit ``sh`` of words ``w`` (int32): the sign bit is the
        complement of the code bit, or'ed onto the bit pattern of 1.0."""
        neg = ((w >> sh) & 1) ^ 1
        return ((neg << 15) | ONE).to(tl.int16).to(XDT, bitcast=True)

    @triton.jit
    def _pair(w, p: tl.constexpr, ONE: tl.constexpr, XDT: tl.constexpr,
              USE_ASM: tl.constexpr):
        """Signs ``p`` and ``p + 16`` of words ``w`` as two halves (..., 2): one shift puts
        bits p and p + 16 on the halves' sign bits, one lop3 makes ``(~t & 0x80008000) | 1.0``
        (+-1 per half), and the 32-bit result is read as its two halves (no instruction)."""
        t = (~(w << (15 - p)) & -2147450880) | (ONE * 65537)  # 0x80008000; ONE in both halves
        if USE_ASM:
            lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [t],
                                               dtype=(tl.int16, tl.int16), is_pure=True,
                                               pack=1)
            lo = lo.to(XDT, bitcast=True)
            hi = hi.to(XDT, bitcast=True)
        else:
            lo = (t & 0xFFFF).to(tl.int16).to(XDT, bitcast=True)
            hi = ((t >> 16) & 0xFFFF).to(tl.int16).to(XDT, bitcast=True)
        return tl.join(lo, hi)

    @triton.jit
    def _pair_tile(w, ONE: tl.constexpr, XDT: tl.constexpr, USE_ASM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr):
        """(BN, BK) +-1 from words ``w`` (BN, BK / 32), 16 pairs per word. The joins nest so
        that the trailing dims are (half, bit 3, bit 2, bit 1, bit 0) of the sign's place in its
        word, i.e. the flattened order is the signs' own order."""
        a0 = tl.join(_pair(w, 0, ONE, XDT, USE_ASM), _pair(w, 8, ONE, XDT, USE_ASM))
        a1 = tl.join(_pair(w, 1, ONE, XDT, USE_ASM), _pair(w, 9, ONE, XDT, USE_ASM))
        a2 = tl.join(_pair(w, 2, ONE, XDT, USE_ASM), _pair(w, 10, ONE, XDT, USE_ASM))
        a3 = tl.join(_pair(w, 3, ONE, XDT, USE_ASM), _pair(w, 11, ONE, XDT, USE_ASM))
        a4 = tl.join(_pair(w, 4, ONE, XDT, USE_ASM), _pair(w, 12, ONE, XDT, USE_ASM))
        a5 = tl.join(_pair(w, 5, ONE, XDT, USE_ASM), _pair(w, 13, ONE, XDT, USE_ASM))
        a6 = tl.join(_pair(w, 6, ONE, XDT, USE_ASM), _pair(w, 14, ONE, XDT, USE_ASM))
        a7 = tl.join(_pair(w, 7, ONE, XDT, USE_ASM), _pair(w, 15, ONE, XDT, USE_ASM))
        b0 = tl.join(a0, a4)
        b1 = tl.join(a1, a5)
        b2 = tl.join(a2, a6)
        b3 = tl.join(a3, a7)
        d = tl.join(tl.join(b0, b2), tl.join(b1, b3))
        return tl.reshape(d, (BN, BK))

    @triton.jit
    def _gemm_small_body(XS, W, SCALE, BIAS, PART, OUT, B, N, K, KWR, KSLICE,
                         HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, DIRECT: tl.constexpr, SWAP: tl.constexpr,
                         PAIRS: tl.constexpr, USE_ASM: tl.constexpr, ONE: tl.constexpr,
                         ALIGNED: tl.constexpr):
        g = tl.program_id(0)
        s = tl.program_id(1)
        XDT = XS.dtype.element_ty
        toks = tl.arange(0, BM)
        rows = g * BN + tl.arange(0, BN)
        tmask = toks < B
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        k_lo = s * KSLICE
        if SWAP:
            acc = tl.zeros((BN, BM), tl.float32)
        else:
            acc = tl.zeros((BM, BN), tl.float32)
        # the last slice's steps past K load nothing
        for kk in range(0, KSLICE, BK):
            k0 = k_lo + kk
            ks = k0 + tl.arange(0, BK)
            a = tl.load(XS + toks[:, None] * K + ks[None, :],
                        mask=tmask[:, None] & (ks < K)[None, :], other=0.0)
            if ALIGNED:  # KWR: int32 words per row
                qs = k0 // 32 + tl.arange(0, BK // 32)
                w = tl.load(W + rows64[:, None] * KWR + qs[None, :],
                            mask=rmask[:, None] & (qs < KWR)[None, :], other=0)
            else:  # KWR: bytes per row; words assembled from 4 bytes (disjoint bit fields)
                bs = k0 // 8 + tl.arange(0, BK // 8)
                byt = tl.load(W + rows64[:, None] * KWR + bs[None, :],
                              mask=rmask[:, None] & (bs < KWR)[None, :], other=0).to(tl.int32)
                sh = tl.arange(0, 4) * 8
                w = tl.sum(tl.reshape(byt, (BN, BK // 32, 4)) << sh[None, None, :], axis=2)
            if PAIRS:
                y = _pair_tile(w, ONE, XDT, USE_ASM, BN, BK)
            else:
                bit = tl.arange(0, 32)
                y = tl.reshape(_signs(w[:, :, None], bit[None, None, :], ONE, XDT), (BN, BK))
            if SWAP:
                acc = tl.dot(y, tl.trans(a), acc)
            else:
                acc = tl.dot(a, tl.trans(y), acc)
        if SWAP:
            acc = tl.trans(acc)  # (BM, BN)
        if DIRECT:  # one slice: scale, bias and cast here
            out = acc * tl.load(SCALE + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                out += tl.load(BIAS + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
            tl.store(OUT + toks[:, None] * N + rows[None, :], out.to(OUT.dtype.element_ty),
                     mask=tmask[:, None] & rmask[None, :])
        else:
            tl.store(PART + (s * B + toks[:, None]) * N + rows[None, :], acc,
                     mask=tmask[:, None] & rmask[None, :])

    @triton.jit
    def _gemm_small_kernel(XS, W, SCALE, BIAS, PART, OUT, B, N, K, KWR, KSLICE,
                           HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr, DIRECT: tl.constexpr, SWAP: tl.constexpr,
                           PAIRS: tl.constexpr, USE_ASM: tl.constexpr, ONE: tl.constexpr,
                           ALIGNED: tl.constexpr):
        _gemm_small_body(XS, W, SCALE, BIAS, PART, OUT, B, N, K, KWR, KSLICE, HAS_BIAS, BM, BN,
                         BK, DIRECT, SWAP, PAIRS, USE_ASM, ONE, ALIGNED)

    @triton.jit
    def _gemm_small_kernel_interp(XS, W, SCALE, BIAS, PART, OUT, B, N, K, KWR,
                                  KSLICE: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                  DIRECT: tl.constexpr, SWAP: tl.constexpr,
                                  PAIRS: tl.constexpr, USE_ASM: tl.constexpr,
                                  ONE: tl.constexpr, ALIGNED: tl.constexpr):
        # Triton 3.6's interpreter takes only constants as loop bounds
        _gemm_small_body(XS, W, SCALE, BIAS, PART, OUT, B, N, K, KWR, KSLICE, HAS_BIAS, BM, BN,
                         BK, DIRECT, SWAP, PAIRS, USE_ASM, ONE, ALIGNED)

    @triton.jit
    def _reduce_kernel(PART, SCALE, BIAS, OUT, B, N, SPLIT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < B * N
        row = i % N
        acc = tl.zeros((BLOCK,), tl.float32)
        for s in range(SPLIT):  # slice order: deterministic
            acc += tl.load(PART + s * B * N + i, mask=m, other=0.0)
        acc *= tl.load(SCALE + row, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(BIAS + row, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + i, acc.to(OUT.dtype.element_ty), mask=m)


@dataclass(frozen=True)
class GemmSmallConfig:
    """One launch configuration: ``BN`` rows and ``BK`` signs per tile, the K split, warps,
    software-pipeline stages, operand order and word-load form (module docstring)."""

    block_n: int = 64
    block_k: int = 256
    split: int = 0  # 0: chosen from the row programs and the SM count
    num_warps: int = 4
    num_stages: int = 3
    swap: bool = True
    pairs: bool = True
    block_m: int = 16  # token rows of the MMA tile (zero-padded beyond the batch)

    def __post_init__(self) -> None:
        if self.block_m not in (16, 32, 64):
            raise ValueError(f"block_m={self.block_m}: use 16, 32 or 64")
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n={self.block_n}: use a power of two >= 16")
        if self.block_k < 32 or self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k={self.block_k}: use a power of two >= 32")
        if self.split < 0:
            raise ValueError(f"split={self.split}: use 0 (automatic) or a positive count")

    @property
    def label(self) -> str:
        return (("" if self.block_m == 16 else f"bm{self.block_m}-")
                + f"bn{self.block_n}-bk{self.block_k}-s{self.split or 'auto'}-w{self.num_warps}"
                f"-st{self.num_stages}-{'swap' if self.swap else 'tok'}"
                f"-{'pairs' if self.pairs else 'bits'}")


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few slices still exercise the reduction


def resolve_split(cfg: GemmSmallConfig, N: int, K: int, sms: int) -> tuple[int, int]:
    """(S, K per slice): ``cfg.split`` or enough slices for ``PROGRAMS_PER_SM`` programs per SM,
    at most one per ``BK`` chunk; each slice a multiple of ``BK``."""
    chunks = -(-K // cfg.block_k)
    if cfg.split:
        S = cfg.split
    else:
        programs = -(-N // cfg.block_n)
        S = max(1, -(-(PROGRAMS_PER_SM * sms) // programs))
    S = min(S, chunks)
    per = -(-chunks // S)  # chunks per slice
    S = -(-chunks // per)  # no empty slice
    return S, per * cfg.block_k


def words_aligned(packed: Tensor) -> bool:
    """Whether the packed rows can be read as int32 words (4-byte rows, aligned base); other
    rows are read byte by byte and assembled into words."""
    return packed.shape[-1] % 4 == 0 and packed.data_ptr() % 4 == 0


# The planner's configurations, from the H200 sweep of bench/kernels/gemm_small_sweep.json
# (Llama-3-8B's four linear shapes, 4 and 16 tokens): rows of whole words ran fastest on
# average with 64-row, 128-sign tiles split 8 ways (within 6 % of each shape's best); byte rows
# with 128 x 256 tiles and the bit-by-bit expansion (the paired one ran 1.8x slower there).
WORD_ROWS = GemmSmallConfig(block_n=64, block_k=128, split=8, num_warps=4)
BYTE_ROWS = GemmSmallConfig(block_n=128, block_k=256, split=0, num_warps=4, pairs=False)


def pick_config(B: int, N: int, K: int, aligned: bool = True) -> GemmSmallConfig:
    """The default configuration for ``B`` tokens and an ``(N, K)`` sign matrix whose rows are
    (``aligned``) or are not whole int32 words."""
    return WORD_ROWS if aligned else BYTE_ROWS


def launch_gemm_small(xs: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None,
                      cfg: GemmSmallConfig | None = None,
                      out_dtype: torch.dtype | None = None) -> Tensor:
    """``scale * (xs @ Y^T) + bias`` for ``xs`` (B, K), ``B <= MAX_TOKENS``, with ``Y`` the
    +-1 matrix of ``packed`` (N, RB) uint8 (words or bytes, :func:`words_aligned`)."""
    B, K = xs.shape
    N, RB = packed.shape
    if not 1 <= B <= MAX_TOKENS:
        raise ValueError(f"gemm_small takes 1..{MAX_TOKENS} tokens, got {B}")
    if RB * 8 < K:
        raise ValueError(f"packed rows hold {RB * 8} signs, activations have {K}")
    if xs.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"gemm_small takes fp16/bf16 activations, got {xs.dtype}")
    check_triton(xs)
    packed = packed.contiguous()
    aligned = words_aligned(packed)
    cfg = cfg or pick_config(B, N, K, aligned)
    S, kslice = resolve_split(cfg, N, K, sm_count(xs.device))
    out = torch.empty(B, N, device=xs.device, dtype=out_dtype or xs.dtype)
    part = (torch.empty(S, B, N, device=xs.device, dtype=torch.float32) if S > 1
            else out.new_empty(0, dtype=torch.float32))
    words = packed.view(torch.int32) if aligned else packed
    one = 0x3C00 if xs.dtype == torch.float16 else 0x3F80
    xs = xs.contiguous()
    bias_t = bias if bias is not None else scale
    with device_ctx(xs):
        kernel = _gemm_small_kernel_interp if interpreting() else _gemm_small_kernel
        kernel[(-(-N // cfg.block_n), S)](
            xs, words, scale, bias_t, part, out, B, N, K, RB // 4 if aligned else RB, kslice,
            HAS_BIAS=bias is not None, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k,
            DIRECT=S == 1, SWAP=cfg.swap, PAIRS=cfg.pairs, USE_ASM=xs.is_cuda, ONE=one,
            ALIGNED=aligned, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if S > 1:
            block = 1024
            _reduce_kernel[(-(-(B * N) // block),)](part, scale, bias_t, out, B, N, SPLIT=S,
                                                   HAS_BIAS=bias is not None, BLOCK=block,
                                                   num_warps=4)
    return out


@torch.library.custom_op("liftquant::int1_gemm_small", mutates_args=())
def int1_gemm_small(xs: Tensor, packed: Tensor, scale: Tensor,
                    bias: Optional[Tensor]) -> Tensor:  # noqa: UP045
    """Decode GEMM for a few tokens with the default configuration; see
    :func:`launch_gemm_small`."""
    return launch_gemm_small(xs, packed, scale, bias)


@int1_gemm_small.register_fake
def _(xs, packed, scale, bias):
    return xs.new_empty(xs.shape[0], packed.shape[0])
