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


def search_pinv_triton(z: Tensor, M: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as ``lattice._search_pinv``: ``(codes (B, D) +-1, pre_sign (B, D))``."""
    if not HAS_TRITON or not (z.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError("search_pinv_triton needs CUDA tensors and Triton; use method='pinv'")
    from liftquant.core.lattice import null_space

    d, D = M.shape
    M = M.float()
    M_pinv, _ = null_space(M)
    u = (z.float() @ M_pinv.T).contiguous()  # (B, D)
    DP, dP = _pow2_at_least(D), _pow2_at_least(d)
    mt = torch.zeros(DP, dP, device=z.device, dtype=torch.float32)
    mt[:D, :d] = M.T
    mt_hi = mt.to(torch.float16)
    mt_lo = (mt - mt_hi.float()).to(torch.float16)
    B, P = z.shape[0], offsets.shape[0]
    best_idx = torch.empty(B, device=z.device, dtype=torch.int32)
    best_dist = torch.empty(B, device=z.device, dtype=torch.float32)
    zf, off = z.float().contiguous(), offsets.float().contiguous()
    args = (u, zf, off, mt_hi, mt_lo, best_idx, best_dist, B)
    if z.is_cuda:

        def launch(lo: int, hi: int) -> None:
            grid = lambda meta: (triton.cdiv(hi - lo, meta["BLOCK_B"]),)  # noqa: E731
            _pinv_search_tuned[grid](u[lo:hi], zf[lo:hi], off, mt_hi, mt_lo, best_idx[lo:hi],
                                     best_dist[lo:hi], hi - lo, P=P, D=D, d=d, DP=DP, dP=dP)

        _tune_small_first(launch, B)
    else:  # Triton interpreter (TRITON_INTERPRET=1): autotuning needs a GPU
        _pinv_search_kernel[(triton.cdiv(B, 16),)](
            *args, P=P, D=D, d=d, DP=DP, dP=dP, BLOCK_B=16, BLOCK_P=16
        )
    pre = u + offsets.float()[best_idx.long()]  # (B, D)
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
