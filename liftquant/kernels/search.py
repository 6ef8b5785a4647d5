"""Fused Triton kernel for the pinv / null-space nearest-code search (lattice.py, SPEC §2).

For each sub-vector z (row of Z, length d) with u = M_pinv z (row of U, length D) the
candidates are ``y_p = sign(u + o_p)`` for every padding offset ``o_p = N^T p`` (row of OFF).
The plain torch version materialises a (B, P, D) tensor and is bound by memory traffic. This
kernel keeps a (BLOCK_B x BLOCK_P) tile of candidates in registers, decodes it with a
tensor-core product against M^T (split into an fp16 high and low part so the distances are
accurate to ~1e-6 relative, like fp32), and keeps a running arg-min per row. Only the best
padding index per row leaves the chip.

Shapes: U (B, D) fp32, Z (B, d) fp32, OFF (P, D) fp32, MT_hi/MT_lo (DP, dP) fp16 zero padded
where DP, dP are D, d rounded up to powers of two (>= 16).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; the CPU build has none.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    HAS_TRITON = False


# The autotuner times every config several times on the launch that first meets a new key. On
# a 4M-row chunk one launch is long, so tuning there cost far more than the search itself per
# block; the first TUNE_ROWS rows are therefore launched (and tuned) on their own.
TUNE_ROWS = 1 << 16


def _tune_small_first(launch, B: int) -> None:
    """``launch(lo, hi)`` on rows [0, TUNE_ROWS) and then on the rest (same results)."""
    first = min(B, TUNE_ROWS)
    launch(0, first)
    if first < B:
        launch(first, B)


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (n - 1).bit_length())


if HAS_TRITON:

    @triton.jit
    def _pinv_search_kernel(
        U, Z, OFF, MT_HI, MT_LO, BEST_IDX, BEST_DIST,
        B,
        P: tl.constexpr, D: tl.constexpr, d: tl.constexpr,  # few distinct values per lattice
        DP: tl.constexpr, dP: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        cols_D = tl.arange(0, DP)
        cols_d = tl.arange(0, dP)
        rmask = rows < B
        u = tl.load(U + rows[:, None] * D + cols_D[None, :],
                    mask=rmask[:, None] & (cols_D[None, :] < D), other=0.0)  # (BB, DP)
        z = tl.load(Z + rows[:, None] * d + cols_d[None, :],
                    mask=rmask[:, None] & (cols_d[None, :] < d), other=0.0)  # (BB, dP)
        mt_hi = tl.load(MT_HI + cols_D[:, None] * dP + cols_d[None, :])  # (DP, dP)
        mt_lo = tl.load(MT_LO + cols_D[:, None] * dP + cols_d[None, :])
        best = tl.full((BLOCK_B,), float("inf"), tl.float32)
        best_i = tl.zeros((BLOCK_B,), tl.int32)
        for p0 in range(0, P, BLOCK_P):
            pidx = p0 + tl.arange(0, BLOCK_P)
            off = tl.load(OFF + pidx[:, None] * D + cols_D[None, :],
                          mask=(pidx[:, None] < P) & (cols_D[None, :] < D), other=0.0)
            v = u[:, None, :] + off[None, :, :]  # (BB, BP, DP)
            y = tl.where(v >= 0, 1.0, -1.0).to(tl.float16)
            y2 = tl.reshape(y, (BLOCK_B * BLOCK_P, DP))
            my = tl.dot(y2, mt_hi) + tl.dot(y2, mt_lo)  # (BB*BP, dP) fp32
            my3 = tl.reshape(my, (BLOCK_B, BLOCK_P, dP))
            diff = my3 - z[:, None, :]
            dist = tl.sum(diff * diff, axis=2)  # (BB, BP)
            dist = tl.where(pidx[None, :] < P, dist, float("inf"))
            m = tl.min(dist, axis=1)
            a = tl.argmin(dist, axis=1).to(tl.int32) + p0
            better = m < best
            best = tl.where(better, m, best)
            best_i = tl.where(better, a, best_i)
        tl.store(BEST_IDX + rows, best_i, mask=rmask)
        tl.store(BEST_DIST + rows, best, mask=rmask)

    _AUTOTUNE_CONFIGS = [
        triton.Config({"BLOCK_B": bb, "BLOCK_P": bp}, num_warps=w)
        for bb, bp, w in ((16, 32, 4), (16, 64, 4), (32, 32, 4), (32, 64, 8), (64, 32, 8))
    ]
    _pinv_search_tuned = triton.autotune(configs=_AUTOTUNE_CONFIGS, key=["P", "DP", "dP"])(
        _pinv_search_kernel
    )


if HAS_TRITON:

    @triton.jit
    def _signs_f16(v, USE_ASM: tl.constexpr):
        """+-1 in float16 for the signs of ``v`` (..., 2K) fp32 (0 and +0 give +1, -0 gives -1,
        as ``v >= 0`` does for every value but -0, which sums never produce here).

        The sign bits of two neighbouring lanes land in one 32-bit word: the high halves of
        the two floats side by side (one byte permute), then one and/or puts 1.0 in each half
        (0x3C00) under its sign bit. The word is read as its two halves (no instruction)."""
        v0, v1 = tl.split(tl.reshape(v, v.shape[:-1] + [v.shape[-1] // 2, 2]))
        b0 = v0.to(tl.int32, bitcast=True)
        b1 = v1.to(tl.int32, bitcast=True)
        if USE_ASM:  # one byte permute and one three-input logic op per pair
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b32 t; prmt.b32 t, $2, $3, 0x7632; "
                "lop3.b32 t, t, 0x80008000, 0x3C003C00, 0xEA; mov.b32 {$0, $1}, t; }",
                "=h,=h,r,r", [b0, b1], dtype=(tl.int16, tl.int16), is_pure=True, pack=1)
        else:
            t = ((b0 >> 16) & 0xFFFF) | (b1 & -65536)  # high half of each float, 0xFFFF0000
            t = (t & -2147450880) | 0x3C003C00  # 0x80008000: the two sign bits; 1.0 under them
            lo = (t & 0xFFFF).to(tl.int16)
            hi = ((t >> 16) & 0xFFFF).to(tl.int16)
        y = tl.join(lo.to(tl.float16, bitcast=True), hi.to(tl.float16, bitcast=True))
        return tl.reshape(y, v.shape)

    @triton.jit
    def _pinv_pairs_kernel(
        U, Z, OFF2, MT_HI, MT_LO, BEST_IDX, BEST_DIST,
        B,
        P: tl.constexpr, D: tl.constexpr, d: tl.constexpr,
        DP: tl.constexpr, dH: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_Q: tl.constexpr, USE_ASM: tl.constexpr,
    ):
        """Two candidates per tensor-core row: paddings ``q`` and ``q + P/2`` side by side.

        OFF2 (P/2, 2 DP) holds ``[o_q | o_(q+P/2)]`` and MT_HI/MT_LO (2 DP, 2 dH) are block
        diagonal, so one product row is ``[M y_q | M y_(q+P/2)]``: every output column is used
        (d = 8 fills the 16 columns tl.dot needs) and a K of 2 DP feeds both halves. Each
        slot keeps its own running best (no reduction across threads inside the loop); the
        slots are reduced once at the end, ties going to the smallest padding index (the
        first arg-min, as torch's argmin over all paddings)."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = rows < B
        k = tl.arange(0, 2 * DP)
        kk = k % DP
        u2 = tl.load(U + rows[:, None] * D + kk[None, :],
                     mask=rmask[:, None] & (kk[None, :] < D), other=0.0)  # (BB, 2DP): [u | u]
        j = tl.arange(0, 2 * dH)
        jj = j % dH
        z2 = tl.load(Z + rows[:, None] * d + jj[None, :],
                     mask=rmask[:, None] & (jj[None, :] < d), other=0.0)  # (BB, 2dH): [z | z]
        mt_hi = tl.load(MT_HI + k[:, None] * (2 * dH) + j[None, :])  # (2DP, 2dH)
        mt_lo = tl.load(MT_LO + k[:, None] * (2 * dH) + j[None, :])
        first = (j < dH)[None, None, :]
        HALF: tl.constexpr = P // 2
        best_a = tl.full((BLOCK_B, BLOCK_Q), float("inf"), tl.float32)
        best_b = tl.full((BLOCK_B, BLOCK_Q), float("inf"), tl.float32)
        idx_a = tl.zeros((BLOCK_B, BLOCK_Q), tl.int32)
        idx_b = tl.zeros((BLOCK_B, BLOCK_Q), tl.int32)
        for q0 in range(0, HALF, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            qmask = q < HALF
            off = tl.load(OFF2 + q[:, None] * (2 * DP) + k[None, :], mask=qmask[:, None],
                          other=0.0)  # (BQ, 2DP), padded lanes are 0
            v = u2[:, None, :] + off[None, :, :]  # (BB, BQ, 2DP)
            y = tl.reshape(_signs_f16(v, USE_ASM), (BLOCK_B * BLOCK_Q, 2 * DP))
            my = tl.dot(y, mt_lo, acc=tl.dot(y, mt_hi))  # (BB*BQ, 2dH) fp32
            diff = tl.reshape(my, (BLOCK_B, BLOCK_Q, 2 * dH)) - z2[:, None, :]
            sq = diff * diff
            da = tl.sum(tl.where(first, sq, 0.0), axis=2)  # (BB, BQ): padding q
            db = tl.sum(tl.where(first, 0.0, sq), axis=2)  # padding q + P/2
            da = tl.where(qmask[None, :], da, float("inf"))
            db = tl.where(qmask[None, :], db, float("inf"))
            ba = da < best_a
            bb = db < best_b
            best_a = tl.where(ba, da, best_a)
            idx_a = tl.where(ba, q[None, :], idx_a)
            best_b = tl.where(bb, db, best_b)
            idx_b = tl.where(bb, q[None, :] + HALF, idx_b)
        m = tl.minimum(tl.min(best_a, axis=1), tl.min(best_b, axis=1))  # (BB,)
        big = 2147483647
        ia = tl.min(tl.where(best_a == m[:, None], idx_a, big), axis=1)
        ib = tl.min(tl.where(best_b == m[:, None], idx_b, big), axis=1)
        tl.store(BEST_IDX + rows, tl.minimum(ia, ib), mask=rmask)
        tl.store(BEST_DIST + rows, m, mask=rmask)

    _PAIRS_CONFIGS = [
        triton.Config({"BLOCK_B": bb, "BLOCK_Q": bq}, num_warps=w)
        for bb, bq, w in ((16, 8, 4), (16, 16, 4), (32, 8, 4), (8, 16, 4), (32, 16, 8),
                          (16, 32, 8))
    ]
    _pinv_pairs_tuned = triton.autotune(configs=_PAIRS_CONFIGS, key=["P", "DP", "dH"])(
        _pinv_pairs_kernel
    )


def _pair_operands(M: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """``(OFF2, MT2_hi, MT2_lo, DP, dH)`` for :func:`_pinv_pairs_kernel` (fp32 offsets)."""
    d, D = M.shape
    DP, dH = _pow2_at_least(D), _pow2_at_least(d, floor=8)
    P = offsets.shape[0]
    off = torch.zeros(P, DP, device=offsets.device, dtype=torch.float32)
    off[:, :D] = offsets.float()
    off2 = torch.cat([off[: P // 2], off[P // 2:]], dim=1).contiguous()  # (P/2, 2DP)
    mt = torch.zeros(2 * DP, 2 * dH, device=M.device, dtype=torch.float32)
    mt[:D, :d] = M.float().T
    mt[DP:DP + D, dH:dH + d] = M.float().T
    mt_hi = mt.to(torch.float16)
    mt_lo = (mt - mt_hi.float()).to(torch.float16)
    return off2, mt_hi.contiguous(), mt_lo.contiguous(), DP, dH


def search_pinv_triton(z: Tensor, M: Tensor, offsets: Tensor, *,
                       paired: bool = True) -> tuple[Tensor, Tensor]:
    """Same contract as ``lattice._search_pinv``: ``(codes (B, D) +-1, pre_sign (B, D))``.

    ``paired`` (default) runs :func:`_pinv_pairs_kernel` (two paddings per tensor-core row);
    ``paired=False`` the one-padding-per-row kernel, kept for A/B benchmarks and as a second
    implementation in the tests. Both pick the first best padding of the same candidates;
    their distances differ only in float32 summation order."""
    if not HAS_TRITON or not (z.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError("search_pinv_triton needs CUDA tensors and Triton; use method='pinv'")
    from liftquant.core.lattice import null_space

    d, D = M.shape
    M = M.float()
    M_pinv, _ = null_space(M)
    # + 0.0 turns -0.0 into +0.0: a sum of two floats that are not -0.0 is never -0.0, so the
    # kernels' sign (v >= 0, or the sign bit in the paired kernel) agrees with pre >= 0 below
    u = (z.float() @ M_pinv.T + 0.0).contiguous()  # (B, D)
    offsets = offsets.float() + 0.0
    B, P = z.shape[0], offsets.shape[0]
    best_idx = torch.empty(B, device=z.device, dtype=torch.int32)
    best_dist = torch.empty(B, device=z.device, dtype=torch.float32)
    zf = z.float().contiguous()
    if paired and P % 2 == 0:
        off2, mt_hi, mt_lo, DP, dH = _pair_operands(M, offsets)
        if z.is_cuda:

            def launch(lo: int, hi: int) -> None:
                grid = lambda meta: (triton.cdiv(hi - lo, meta["BLOCK_B"]),)
                _pinv_pairs_tuned[grid](u[lo:hi], zf[lo:hi], off2, mt_hi, mt_lo,
                                        best_idx[lo:hi], best_dist[lo:hi], hi - lo, P=P, D=D,
                                        d=d, DP=DP, dH=dH, USE_ASM=True)

            _tune_small_first(launch, B)
        else:  # Triton interpreter: no autotuning, no inline assembly
            _pinv_pairs_kernel[(triton.cdiv(B, 16),)](
                u, zf, off2, mt_hi, mt_lo, best_idx, best_dist, B, P=P, D=D, d=d, DP=DP, dH=dH,
                BLOCK_B=16, BLOCK_Q=8, USE_ASM=False)
    else:
        DP, dP = _pow2_at_least(D), _pow2_at_least(d)
        mt = torch.zeros(DP, dP, device=z.device, dtype=torch.float32)
        mt[:D, :d] = M.T
        mt_hi = mt.to(torch.float16)
        mt_lo = (mt - mt_hi.float()).to(torch.float16)
        off = offsets.contiguous()
        if z.is_cuda:

            def launch(lo: int, hi: int) -> None:
                grid = lambda meta: (triton.cdiv(hi - lo, meta["BLOCK_B"]),)  # noqa: E731
                _pinv_search_tuned[grid](u[lo:hi], zf[lo:hi], off, mt_hi, mt_lo,
                                         best_idx[lo:hi], best_dist[lo:hi], hi - lo, P=P, D=D,
                                         d=d, DP=DP, dP=dP)

            _tune_small_first(launch, B)
        else:  # Triton interpreter (TRITON_INTERPRET=1): autotuning needs a GPU
            _pinv_search_kernel[(triton.cdiv(B, 16),)](
                u, zf, off, mt_hi, mt_lo, best_idx, best_dist, B, P=P, D=D, d=d, DP=DP, dP=dP,
                BLOCK_B=16, BLOCK_P=16
            )
    pre = u + offsets[best_idx.long()]  # (B, D)
    codes = torch.where(pre >= 0, 1.0, -1.0)
    return codes, pre


if HAS_TRITON:

    @triton.jit
    def _exhaustive_search_kernel(
        C_HI, C_LO, Q, BEST_IDX, BEST_SCORE,
        B,
        N_CODES: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Exact search: score(y) = ||M y||^2 - 2 (M^T z) . y over all 2^D codes.

        Codes are generated from their index (bit k of index j is +1 iff set), so only the
        per-code norms Q (2^D,) are read from memory. C = M^T z is split into fp16 high and low
        parts so the tensor-core product is accurate to ~1e-6 relative.
        """
        pid = tl.program_id(0)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        k = tl.arange(0, DP)
        rmask = rows < B
        c_hi = tl.load(C_HI + rows[:, None] * DP + k[None, :], mask=rmask[:, None], other=0.0)
        c_lo = tl.load(C_LO + rows[:, None] * DP + k[None, :], mask=rmask[:, None], other=0.0)
        best = tl.full((BLOCK_B,), float("inf"), tl.float32)
        best_i = tl.zeros((BLOCK_B,), tl.int32)
        for j0 in range(0, N_CODES, BLOCK_C):
            j = j0 + tl.arange(0, BLOCK_C)
            bits = (j[None, :] >> k[:, None]) & 1  # (DP, BC)
            y = tl.where(k[:, None] < D, bits * 2 - 1, 0).to(tl.float16)
            cy = tl.dot(c_hi, y) + tl.dot(c_lo, y)  # (BB, BC)
            q = tl.load(Q + j)
            score = q[None, :] - 2.0 * cy
            m = tl.min(score, axis=1)
            a = tl.argmin(score, axis=1).to(tl.int32) + j0
            better = m < best
            best = tl.where(better, m, best)
            best_i = tl.where(better, a, best_i)
        tl.store(BEST_IDX + rows, best_i, mask=rmask)
        tl.store(BEST_SCORE + rows, best, mask=rmask)

    _EXH_CONFIGS = [
        triton.Config({"BLOCK_B": bb, "BLOCK_C": bc}, num_warps=w)
        for bb, bc, w in ((64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8))
    ]
    _exhaustive_search_tuned = triton.autotune(configs=_EXH_CONFIGS, key=["N_CODES", "DP"])(
        _exhaustive_search_kernel
    )

# Per-code norms ||M y||^2 for the exhaustive kernel, cached per matrix (device, data, shape).
_Q_CACHE: dict[tuple, tuple[Tensor, Tensor]] = {}


def _code_norms(M: Tensor) -> Tensor:
    from liftquant.core.lattice import codes_from_index

    key = (M.device, M.data_ptr(), M._version, tuple(M.shape))
    if key not in _Q_CACHE:
        if len(_Q_CACHE) > 4:
            _Q_CACHE.clear()
        D = M.shape[1]
        q = torch.empty(1 << D, device=M.device, dtype=torch.float32)
        step = 1 << 20
        for s in range(0, 1 << D, step):  # chunked: all_codes(24) would be 1.6 GB at once
            idx = torch.arange(s, min(s + step, 1 << D), device=M.device)
            y = codes_from_index(idx, D)
            q[s:s + idx.numel()] = (y @ M.float().T).square().sum(-1)
        _Q_CACHE[key] = (M.detach(), q)  # holding M keeps its address from being reused
    return _Q_CACHE[key][1]


def search_exhaustive_triton(z: Tensor, M: Tensor) -> Tensor:
    """Exact nearest code for rows of z (B, d): (B, D) float +-1 (same as the torch oracle)."""
    if not HAS_TRITON or not (z.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError("search_exhaustive_triton needs CUDA tensors and Triton")
    from liftquant.core.lattice import codes_from_index

    d, D = M.shape
    DP = _pow2_at_least(D)
    c = torch.zeros(z.shape[0], DP, device=z.device, dtype=torch.float32)
    c[:, :D] = z.float() @ M.float()  # (B, D): M^T z per row
    c_hi = c.to(torch.float16)
    c_lo = (c - c_hi.float()).to(torch.float16)
    q = _code_norms(M)
    B = z.shape[0]
    best_idx = torch.empty(B, device=z.device, dtype=torch.int32)
    best_score = torch.empty(B, device=z.device, dtype=torch.float32)
    args = (c_hi, c_lo, q, best_idx, best_score, B)
    if z.is_cuda:

        def launch(lo: int, hi: int) -> None:
            grid = lambda meta: (triton.cdiv(hi - lo, meta["BLOCK_B"]),)  # noqa: E731
            _exhaustive_search_tuned[grid](c_hi[lo:hi], c_lo[lo:hi], q, best_idx[lo:hi],
                                           best_score[lo:hi], hi - lo, N_CODES=1 << D, D=D,
                                           DP=DP)

        _tune_small_first(launch, B)
    else:
        _exhaustive_search_kernel[(triton.cdiv(B, 16),)](
            *args, N_CODES=1 << D, D=D, DP=DP, BLOCK_B=16, BLOCK_C=16
        )
    return codes_from_index(best_idx, D)
