"""Split-K row-stream int1 GEMV for decode: activations loaded once, weights streamed.

Grid ``(S, G, B)``: program ``(s, g, b)`` owns K-slice ``s`` (``BW`` packed words, so the split
factor is ``S = ceil(KW / BW)``) and row group ``g`` (``RPP`` rows) of token ``b``.

* **Activations stay in registers.** The program loads its slice of the pair layout (16 fp16x2
  registers per word) and the word scales once, then streams ``RPP`` rows of packed weights
  through them, ``BN`` rows per step with the next step's words already in flight. Activation
  traffic falls from 16 / BN bytes per weight byte (row-tile kernel) to 16 / RPP.
* **Word loop** (``SplitKConfig.word_loop``; see ``int1_words`` for the pair layout):
  ``v2``: per pair ``lop3 + fma.f16x2`` (``w & mask_p`` times ``y_p`` adds ``2 x bit``), the
  sign pair as ``+-1 * (-x)``; the ``-sum x`` correction is row independent, so it is summed
  once per program instead of once per word and row. ``v1``: per pair ``shl + lop3 +
  add.f16x2``, a sign flip of ``x' = 2^V1_SHIFT x`` (precomputed once per program from the pair
  layout); no correction. Both sum the 16 pairs of a word in fp16x2, then ``lo + hi`` in fp32
  times the word scale. Without inline PTX both run as plain-Triton emulations with fp32 sums
  (interpreter, non-NVIDIA targets), so CPU tests check the same bit logic.
* **Reduction.** With ``S > 1`` each program writes fp32 row partials to a workspace
  ``(B, S, N)``; the last program of a row group to arrive (a per-group counter, atomic
  ``acq_rel`` after a barrier and a ``fence.acq_rel.gpu``, as in the CUDA threadFenceReduction
  sample) sums the ``S`` partials in slice order (deterministic), applies scale and bias,
  writes the output and resets the counter: one launch, no memset. ``S == 1`` writes the
  output directly.

The workspace is per device and reused by every call, so split-K GEMVs on one device must not
run concurrently on different streams. It is allocated outside CUDA-graph capture only:
:func:`workspace_ready` says whether a launch can run inside a capture.
"""

from __future__ import annotations

import threading
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

# v1 keeps x' = 2^V1_SHIFT x_scaled in fp16: |x_scaled| <= 2^-10 (X_LIMIT) gives |x'| <= 2^10,
# a 32-term word sum stays below 2^15, and x' is a normal fp16 down to |x_scaled| = 2^-34.
V1_SHIFT = 20
# Rows per chunk when the last program sums the partials of its row group.
REDUCE_ROWS = 64
# Workspace minimum sizes (fp32 partials, int32 counters): one allocation serves every
# Llama-3 8B/70B linear.
MIN_PARTIALS = 1 << 20
MIN_COUNTERS = 1 << 14

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

    _HALF_SUM_ASM = tl.constexpr(
        "{ .reg .b16 l, h; .reg .f32 a, b; mov.b32 {l, h}, $1; cvt.f32.f16 a, l; "
        "cvt.f32.f16 b, h; add.f32 $0, a, b; }")
    _FENCE_ASM = tl.constexpr("fence.acq_rel.gpu; mov.b32 $0, $1;")
    # Partials stored straight from the row-reduction layout: a plain tl.store would first
    # move them to a coalesced layout through shared memory (two barriers per step).
    _STORE_F32_ASM = tl.constexpr(
        "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.f32 [$1], $2; mov.b32 $0, 0; }")
    _V1_UP = tl.constexpr(2.0**V1_SHIFT)
    _V1_DOWN = tl.constexpr(2.0**-V1_SHIFT)

    @constexpr_function
    def _v1_pair_asm(p, first):
        """Sign flip of x'_p by bits p and p + 16: t = w << (15 - p); (~t & 0x80008000) ^ x'."""
        shift = "" if p == 15 else f"shl.b32 t, t, {15 - p}; "
        add = "mov.b32 $0, t;" if first else "add.rn.f16x2 $0, t, $3;"
        return ("{ .reg .b32 t; mov.b32 t, $1; " + shift + "and.b32 t, t, 0x80008000; "
                "xor.b32 t, t, 0x80008000; xor.b32 t, t, $2; " + add + " }")

    @triton.jit
    def _pack_f16x2(lo, hi):
        lo16 = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi16 = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        return lo16 | (hi16 << 16)

    @triton.jit
    def _slice_activations(XP, XSC, qs, KW, V1: tl.constexpr):
        """The program's K-slice: 16 pair operands (BW,) int32, word scales, and the
        row-independent term subtracted from every row (v2: sum_q scale_q sum_{p<15} x)."""
        qmask = qs < KW
        xsc = tl.load(XSC + qs, mask=qmask, other=0.0)
        xsum = tl.zeros(qs.shape, tl.float32)
        ys = ()
        for p in tl.static_range(16):
            y = tl.load(XP + p * KW + qs, mask=qmask, other=0)
            lo = half_to_f32(y & 0xFFFF) * pair_factor(p)  # x of sign 32q + p
            hi = half_to_f32((y >> 16) & 0xFFFF) * pair_factor(p)  # x of sign 32q + p + 16
            if V1:
                ys = ys + (_pack_f16x2(lo * _V1_UP, hi * _V1_UP),)
            else:
                ys = ys + (y,)
                if p < 15:
                    xsum += lo + hi
        if V1:
            xsc = xsc * _V1_DOWN
            corr = tl.sum(xsum, axis=0)  # 0
        else:
            corr = tl.sum(xsum * xsc, axis=0)
        return ys, xsc, corr

    @triton.jit
    def _tile_dot(w, ys, USE_ASM: tl.constexpr, V1: tl.constexpr):
        """(BN, BW) fp32 word sums: v2 sum_{p<15} 2 x bit + s_15 x_15, v1 sum s x'."""
        if USE_ASM:
            acc = w  # placeholder, overwritten at p = 0
            for p in tl.static_range(16):
                y = ys[p][None, :]
                if V1:
                    if p == 0:
                        acc = tl.inline_asm_elementwise(_v1_pair_asm(p, True), "=r,r,r", [w, y],
                                                        dtype=tl.int32, is_pure=True, pack=1)
                    else:
                        acc = tl.inline_asm_elementwise(_v1_pair_asm(p, False), "=r,r,r,r",
                                                        [w, y, acc], dtype=tl.int32,
                                                        is_pure=True, pack=1)
                elif p == 0:
                    acc = tl.inline_asm_elementwise(PAIR_MUL_ASM, "=r,r,r,r",
                                                    [w, pair_mask(p), y], dtype=tl.int32,
                                                    is_pure=True, pack=1)
                elif p < 15:
                    acc = tl.inline_asm_elementwise(PAIR_FMA_ASM, "=r,r,r,r,r",
                                                    [w, pair_mask(p), y, acc], dtype=tl.int32,
                                                    is_pure=True, pack=1)
                else:
                    acc = tl.inline_asm_elementwise(SIGN_FMA_ASM, "=r,r,r,r", [w, y, acc],
                                                    dtype=tl.int32, is_pure=True, pack=1)
            part = tl.inline_asm_elementwise(_HALF_SUM_ASM, "=f,r", [acc], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:  # the same bit logic in plain Triton, fp32 sums
            part = tl.zeros(w.shape, tl.float32)
            for p in tl.static_range(16):
                y = ys[p][None, :]
                if V1:
                    t = ~(w << (15 - p)) & -2147450880  # 0x80008000: flip where the bit is 0
                    v = t ^ y
                    part += half_to_f32(v & 0xFFFF) + half_to_f32((v >> 16) & 0xFFFF)
                else:
                    ylo = half_to_f32(y & 0xFFFF)
                    yhi = half_to_f32((y >> 16) & 0xFFFF)
                    if p < 15:
                        m = w & pair_mask(p)
                        part += half_to_f32(m & 0xFFFF) * ylo + half_to_f32((m >> 16) & 0xFFFF) * yhi
                    else:
                        part += tl.where((w & 0x8000) != 0, -ylo, ylo)
                        part += tl.where(w < 0, -yhi, yhi)
        return part

    @triton.jit
    def _load_tile(W, wptr, rbyte, rmask, kmask, qs, NWT, ALIGNED: tl.constexpr,
                   USE_ASM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
        """Packed words [qs] of BN rows as (BN, BW) int32, 16-byte vector loads. Aligned rows
        come from the pointer tile ``wptr``; other rows start at byte ``rbyte``."""
        if ALIGNED:
            w = tl.load(wptr, mask=rmask[:, None] & kmask[None, :], other=0)
        else:
            w = realign_words(W, (rbyte // 16) * 4, (rbyte % 16).to(tl.int32), rmask, qs, NWT,
                              USE_ASM, BN, BW)
        return w

    @triton.jit
    def _finish(acc, rows, rmask, SCALE, BIAS, OUT, HAS_BIAS: tl.constexpr):
        out = acc * tl.load(SCALE + rows, mask=rmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            out += tl.load(BIAS + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(OUT + rows, out.to(OUT.dtype.element_ty), mask=rmask)

    @triton.jit
    def _member(N, N0, N1, RPP):
        """Group member of row group ``program_id(1)``: (member, first row, row stop).

        Members 0, 1, 2 own rows [0, N0), [N0, N0 + N1), [N0 + N1, N) of the concatenated
        weights; each starts a new row group. A single layer is N0 = N, N1 = 0.
        """
        g = tl.program_id(1)
        G0 = tl.cdiv(N0, RPP)
        G1 = tl.cdiv(N1, RPP)
        m = (g >= G0).to(tl.int32) + (g >= G0 + G1).to(tl.int32)
        g_start = tl.where(m == 0, 0, tl.where(m == 1, G0, G0 + G1))
        row0 = tl.where(m == 0, 0, tl.where(m == 1, N0, N0 + N1))
        row_end = tl.where(m == 0, N0, tl.where(m == 1, N0 + N1, N))
        r_first = row0 + (g - g_start) * RPP
        return m, r_first, tl.minimum(r_first + RPP, row_end)

    @triton.jit
    def _splitk_body(W, XP, XSC, SCALE, BIAS, OUT, PART, CNT, N, KW, KQ, RS, NWT,
                     m, r_first, r_stop, n_steps, n_split, n_red, HAS_BIAS: tl.constexpr,
                     ALIGNED: tl.constexpr, USE_ASM: tl.constexpr, V1: tl.constexpr,
                     BN: tl.constexpr, BW: tl.constexpr, RC: tl.constexpr, PDL: tl.constexpr):
        s = tl.program_id(0)
        g = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        xb = m.to(tl.int64) * tl.num_programs(2) + b  # member-major activations
        qs = s * BW + tl.arange(0, BW)
        rows = r_first + tl.arange(0, BN)
        # Row addresses advance by one step per iteration (no per-step 64-bit multiplies).
        # Aligned: RS = words per row, a multiple of 4, and the K mask is 4-word granular
        # (max_constancy: Triton cannot see that KQ counts whole 16-byte groups).
        kmask = tl.max_constancy((qs // 4) < KQ, 4)
        rbyte = rows.to(tl.int64) * RS  # unaligned: RS = bytes per row
        if ALIGNED:
            step = tl.multiple_of(BN * RS, 4)
            wptr = W + tl.multiple_of(rbyte, 4)[:, None] + qs[None, :]
        else:
            step = BN * RS
            wptr = W  # unused
        w_next = _load_tile(W, wptr, rbyte, rows < r_stop, kmask, qs, NWT, ALIGNED, USE_ASM,
                            BN, BW)
        # The first weights are in flight; with PDL the transform that writes the activations
        # may still be running until here.
        grid_wait(PDL)
        ys, xsc, corr = _slice_activations(XP + xb * 16 * KW, XSC + xb * KW, qs, KW, V1)
        for _ in range(n_steps):
            w = w_next  # software pipelining: the next rows load while these are summed
            wptr += step
            rbyte += step
            w_next = _load_tile(W, wptr, rbyte, rows + BN < r_stop, kmask, qs, NWT, ALIGNED,
                                USE_ASM, BN, BW)
            acc = tl.sum(_tile_dot(w, ys, USE_ASM, V1) * xsc[None, :], axis=1) - corr
            if n_split == 1:
                _finish(acc, rows, rows < r_stop, SCALE, BIAS, OUT + b * N, HAS_BIAS)
            elif USE_ASM:
                dst = (PART + (b * n_split + s) * N + rows).to(tl.int64)
                tl.inline_asm_elementwise(_STORE_F32_ASM, "=r,l,f,r",
                                          [dst, acc, (rows < r_stop).to(tl.int32)],
                                          dtype=tl.int32, is_pure=False, pack=1)
            else:
                tl.store(PART + (b * n_split + s) * N + rows, acc, mask=rows < r_stop)
            rows += BN
        if n_split > 1:
            if USE_ASM:  # every thread publishes its partials (threadFenceReduction pattern)
                tl.inline_asm_elementwise(_FENCE_ASM, "=r,r", [rows], dtype=tl.int32,
                                          is_pure=False, pack=1)
            tl.debug_barrier()
            count = tl.atomic_add(CNT + b * tl.num_programs(1) + g, 1, sem="acq_rel",
                                  scope="gpu")
            if count == n_split - 1:  # last of the group: sum partials in slice order
                for j in range(n_red):
                    red_rows = r_first + j * RC + tl.arange(0, RC)
                    red_mask = red_rows < r_stop
                    total = tl.zeros((RC,), tl.float32)
                    for t in range(n_split):
                        total += tl.load(PART + (b * n_split + t) * N + red_rows, mask=red_mask,
                                         other=0.0, cache_modifier=".cg")
                    _finish(total, red_rows, red_mask, SCALE, BIAS, OUT + b * N, HAS_BIAS)
                tl.store(CNT + b * tl.num_programs(1) + g, 0)  # ready for the next launch

    # KQ, RS and RPP are not specialised (no divisibility-by-16 variants): the loads get their
    # alignment from tl.multiple_of and the 4-word mask. NWT is a multiple of 16 by design.
    @triton.jit(do_not_specialize=["N", "N0", "N1", "KW", "KQ", "RS", "RPP", "n_split"])
    def _splitk_kernel(W, XP, XSC, SCALE, BIAS, OUT, PART, CNT, N, N0, N1, KW, KQ, RS, NWT, RPP,
                       n_split, HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr,
                       USE_ASM: tl.constexpr, V1: tl.constexpr, BN: tl.constexpr,
                       BW: tl.constexpr, RC: tl.constexpr, PDL: tl.constexpr):
        m, r_first, r_stop = _member(N, N0, N1, RPP)
        rows_here = r_stop - r_first
        _splitk_body(W, XP, XSC, SCALE, BIAS, OUT, PART, CNT, N, KW, KQ, RS, NWT, m, r_first,
                     r_stop, tl.cdiv(rows_here, BN), n_split, tl.cdiv(rows_here, RC), HAS_BIAS,
                     ALIGNED, USE_ASM, V1, BN, BW, RC, PDL)

    @triton.jit
    def _splitk_kernel_interp(W, XP, XSC, SCALE, BIAS, OUT, PART, CNT, N, N0, N1, KW, KQ, RS,
                              NWT, RPP, n_steps: tl.constexpr, n_split: tl.constexpr,
                              n_red: tl.constexpr, HAS_BIAS: tl.constexpr,
                              ALIGNED: tl.constexpr, USE_ASM: tl.constexpr, V1: tl.constexpr,
                              BN: tl.constexpr, BW: tl.constexpr, RC: tl.constexpr):
        # The interpreter (numpy 2) needs constexpr loop bounds; masks cover the last group.
        m, r_first, r_stop = _member(N, N0, N1, RPP)
        _splitk_body(W, XP, XSC, SCALE, BIAS, OUT, PART, CNT, N, KW, KQ, RS, NWT, m, r_first,
                     r_stop, n_steps, n_split, n_red, HAS_BIAS, ALIGNED, USE_ASM, V1, BN, BW, RC,
                     False)


@dataclass(frozen=True)
class SplitKConfig:
    """Launch configuration of the split-K GEMV for one problem shape."""

    block_w: int  # packed words per K-slice: split factor S = ceil(KW / block_w)
    block_n: int  # rows per loop step (loaded one step ahead)
    rows_per_program: int  # rows streamed by one program (a multiple of block_n)
    num_warps: int
    use_asm: bool = True
    word_loop: str = "v2"  # "v2": lop3 + fma.f16x2 per pair; "v1": shl + lop3 + add.f16x2

    def split(self, KW: int) -> int:
        return -(-KW // self.block_w)

    @property
    def label(self) -> str:
        return (f"splitk:{self.word_loop}:w{self.block_w}:n{self.block_n}"
                f":r{self.rows_per_program}:x{self.num_warps}" + ("" if self.use_asm else ":noasm"))


class Workspaces:
    """fp32 partials and zeroed int32 counters per device. A larger request allocates a new
    pair and keeps the old one alive: CUDA graphs captured earlier still point at it."""

    def __init__(self) -> None:
        self.current: dict[str, tuple[Tensor, Tensor]] = {}
        self.retired: list[tuple[Tensor, Tensor]] = []

    def fits(self, device: torch.device, n_part: int, n_cnt: int) -> bool:
        ws = self.current.get(str(device))
        return ws is not None and ws[0].numel() >= n_part and ws[1].numel() >= n_cnt

    def get(self, device: torch.device, n_part: int, n_cnt: int) -> tuple[Tensor, Tensor]:
        if not self.fits(device, n_part, n_cnt):
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("split-K GEMV workspace must be allocated before CUDA graph "
                                   "capture (run the layer once eagerly first)")
            old = self.current.get(str(device))
            if old is not None:
                self.retired.append(old)
                n_part, n_cnt = max(n_part, old[0].numel()), max(n_cnt, old[1].numel())
            self.current[str(device)] = _allocate(device, max(n_part, MIN_PARTIALS),
                                                  max(n_cnt, MIN_COUNTERS))
        return self.current[str(device)]


def _allocate(device: torch.device, n_part: int, n_cnt: int) -> tuple[Tensor, Tensor]:
    if device.type != "cuda":
        return (torch.empty(n_part, device=device, dtype=torch.float32),
                torch.zeros(n_cnt, device=device, dtype=torch.int32))
    # Allocated from a helper thread on a side stream: torch.compile's CUDA-graph warm-up
    # routes the allocations of the calling thread (torch 2.11: the thread, not only the
    # stream) into its graph pool, whose state it later rewinds and checks for leaks; this
    # never-freed pair must live outside that pool.
    made: dict[str, tuple[Tensor, Tensor] | BaseException] = {}

    def work() -> None:
        try:
            torch.cuda.set_device(device)
            side = torch.cuda.Stream(device)
            with torch.cuda.stream(side):
                made["ws"] = (torch.empty(n_part, device=device, dtype=torch.float32),
                              torch.zeros(n_cnt, device=device, dtype=torch.int32))
            side.synchronize()  # the counters are zero before any use
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            made["ws"] = err

    worker = threading.Thread(target=work, name="liftquant-workspace")
    worker.start()
    worker.join()
    if isinstance(made["ws"], BaseException):
        raise made["ws"]
    return made["ws"]


WORKSPACES = Workspaces()  # used by direct launches; backends own theirs
_Workspaces = Workspaces


def _sizes(B: int, N: int, KW: int, cfg: SplitKConfig,
           members: tuple[int, ...] | None = None) -> tuple[int, int, int, int]:
    """(split S, row groups G, partial floats, counters)."""
    S = cfg.split(KW)
    G = sum(-(-n // cfg.rows_per_program) for n in (members or (N,)))
    return S, G, (B * S * N if S > 1 else 0), (B * G if S > 1 else 0)


def check_members(members: tuple[int, ...] | None, N: int, M: int) -> tuple[int, int]:
    """(N0, N1) kernel arguments of a group of ``M`` layers with ``members`` output rows."""
    if members is None:
        members = (N,)
    if not 1 <= len(members) <= 3 or len(members) != M or sum(members) != N or min(members) < 1:
        raise ValueError(f"a GEMV group has 1 to 3 members whose rows {members} sum to the "
                         f"packed rows {N}, one activation block each ({M} given)")
    return members[0], (members[1] if len(members) > 1 else 0)


def workspace_ready(xp: Tensor, packed: Tensor, cfg: SplitKConfig,
                    members: tuple[int, ...] | None = None,
                    workspaces: Workspaces | None = None) -> bool:
    """Whether a launch with ``cfg`` needs no new workspace (what a CUDA-graph capture needs)."""
    M = len(members) if members else 1
    _, _, n_part, n_cnt = _sizes(xp.shape[0] // M, packed.shape[0], xp.shape[-1], cfg, members)
    return n_part == 0 or (workspaces or WORKSPACES).fits(xp.device, n_part, n_cnt)


def launch_gemv_splitk(xp: Tensor, wsc: Tensor, packed: Tensor, scale: Tensor,
                       bias: Tensor | None, out_dtype: torch.dtype, *,
                       cfg: SplitKConfig, members: tuple[int, ...] | None = None,
                       pdl: bool = False, workspaces: Workspaces | None = None) -> Tensor:
    """``out[b] = scale * (Y @ x_b) + bias`` from the pair layout (``xp`` int32 (B, 16, KW),
    word scales ``wsc`` (B, KW)), split along K as ``cfg`` says.

    ``members``: a group of layers that read the same input through different transforms
    (q/k/v): their packed rows concatenated, ``members`` rows each, and one activation block
    per member, member-major ((M B, 16, KW), as ``fused_transform`` writes for stacked side
    tensors). The output is (B, sum(members)), the members' outputs side by side.

    ``pdl``: launch with programmatic dependent launch (the planner's decision);
    ``workspaces``: the owning backend's split-K workspaces (default: the module's).
    """
    check_triton(xp)
    if cfg.rows_per_program % cfg.block_n:
        raise ValueError(f"rows_per_program must be a multiple of block_n: {cfg}")
    M = len(members) if members else 1
    MB, _, KW = xp.shape
    B = MB // M
    N = packed.shape[0]
    N0, N1 = check_members(members, N, M)
    if MB != M * B or wsc.shape[0] != MB:
        raise ValueError(f"activations for {MB} (member, token) pairs do not split into {M} "
                         "members")
    words, aligned, rs, nwt = word_view(packed)
    S, G, n_part, n_cnt = _sizes(B, N, KW, cfg, members)
    if S > 1:
        part, cnt = (workspaces or WORKSPACES).get(xp.device, n_part, n_cnt)
    else:  # never touched; empty tensors keep the kernel signature (and its binary) the same
        part = torch.empty(0, device=xp.device, dtype=torch.float32)
        cnt = torch.empty(0, device=xp.device, dtype=torch.int32)
    out = torch.empty(B, N, device=xp.device, dtype=out_dtype)
    args = (words, xp, wsc, scale, bias if bias is not None else scale, out, part, cnt,
            N, N0, N1, KW, -(-KW // 4), rs, nwt, cfg.rows_per_program)
    meta = {"HAS_BIAS": bias is not None, "ALIGNED": aligned, "V1": cfg.word_loop == "v1",
            "BN": cfg.block_n, "BW": cfg.block_w, "RC": REDUCE_ROWS, "num_warps": cfg.num_warps}
    with device_ctx(xp):
        if interpreting():
            _splitk_kernel_interp[(S, G, B)](
                *args, n_steps=cfg.rows_per_program // cfg.block_n, n_split=S,
                n_red=-(-cfg.rows_per_program // REDUCE_ROWS), USE_ASM=False, **meta)
        else:
            _splitk_kernel[(S, G, B)](*args, S, USE_ASM=cfg.use_asm, **meta,
                                      **pdl_launch(pdl))
    return out
