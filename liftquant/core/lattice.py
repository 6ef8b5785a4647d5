"""Lifted lattices: the mapping matrix M (paper Eq. 1) and nearest-code search.

A sub-vector ``z`` of length ``d`` (``target_dim``) is stored as ``D`` (``lifted_dim``) sign bits
``y in {-1, +1}^D`` and decoded as ``z_hat = M @ y`` with one fixed real matrix ``M`` (d x D).
The rate is ``D / d`` bits per weight. ``M`` is trained to minimise the per-dimension MSE on a
standard Gaussian source::

    mse(M) = E_{z ~ N(0, I_d)} min_y ||z - M y||^2 / d                      (Eq. 1)

Legend: ``D`` lifted dim, ``d`` target dim, ``M`` (d, D), ``M_pinv`` (D, d) pseudo-inverse,
``N`` (D - d, D) orthonormal basis of ker(M), ``p in {-1, +1}^(D - d)`` a null-space padding.

Search methods (all return codes as int8 tensors of +-1, shape (..., D)):

* ``exhaustive``: the exact minimiser over all 2^D codes, written as a matmul
  ``score(y) = ||M y||^2 - 2 (M^T z) . y`` so the work is one (B, D) x (D, 2^D) product.
* ``pinv``: the published heuristic: candidates ``y_p = sign(M_pinv z + N^T p)`` for every
  padding ``p``, keep the closest. Cost 2^(D - d) candidates per sub-vector.
* ``refine`` (bool, default on for ``pinv``): greedy single-bit flips on top of the chosen
  code while any flip lowers the distance. Never increases the distance.

Everything here is pure tensor code on CPU or CUDA; big inputs are processed in chunks so
memory stays bounded (``MAX_CHUNK_ELEMENTS``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from liftquant.core.hadamard import positive_qr, random_orthogonal
from liftquant.core.latticespec import (  # noqa: F401 - re-exported: the lattice API in one place
    AUTO_EXHAUSTIVE_DIM,
    BASIS_SEED,
    CPU_EXHAUSTIVE_DIM,
    LATTICE_DIR,
    MAX_EXHAUSTIVE_DIM,
    MAX_NULL_DIM,
    SEARCH_BASES,
    LatticeSpec,
    check_lattice_file,
    lattice_path,
    search_bases,
    shipped_lattices,
)
from liftquant.util.log import get_logger

logger = get_logger("lattice")

# Bound on elements of any (batch x candidates x D) intermediate: 2^26 floats = 256 MiB fp32.
MAX_CHUNK_ELEMENTS = 1 << 26
# A latent weight never starts closer to zero than this (bits flipped by refinement, exact
# ties); small enough that a sign can still flip during intra-block correction.
PRE_SIGN_FLOOR = 1e-3


def load_projection(spec: LatticeSpec | str, root: str | Path | None = None) -> Tensor:
    """Load ``M`` (d, D) for ``spec`` from ``root`` (default: the shipped ``lattice/`` folder)."""
    spec = LatticeSpec.parse(spec)
    path = check_lattice_file(spec, root)
    M = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(M, Tensor) or tuple(M.shape) != (spec.target_dim, spec.lifted_dim):
        raise ValueError(
            f"{path} does not hold a ({spec.target_dim}, {spec.lifted_dim}) tensor "
            f"(got {getattr(M, 'shape', type(M))}); regenerate it with lattice_generator.py"
        )
    return M.float()


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------
def codes_from_index(idx: Tensor, n: int, *, dtype=torch.float32) -> Tensor:
    """Sign vectors (len(idx), n) of code indices: bit j of index i is +1 iff (i >> j) & 1."""
    bits = (idx.long()[:, None] >> torch.arange(n, device=idx.device)) & 1  # (len(idx), n)
    return (bits * 2 - 1).to(dtype)


def all_codes(n: int, *, device=None, dtype=torch.float32) -> Tensor:
    """All 2^n sign vectors as a (2^n, n) tensor, in index order (:func:`codes_from_index`)."""
    if n > MAX_EXHAUSTIVE_DIM:
        raise ValueError(f"refusing to enumerate 2^{n} codes (max 2^{MAX_EXHAUSTIVE_DIM})")
    return codes_from_index(torch.arange(1 << n, device=device), n, dtype=dtype)


_NULL_CACHE: dict[tuple, tuple[Tensor, tuple[Tensor, Tensor]]] = {}


def null_space(M: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(M_pinv (D, d), N (D - d, D))`` with N an orthonormal basis of ker(M).

    Cached per matrix (device, storage, version): the SVD is computed once, on the CPU in
    float64, instead of a GPU SVD launch on every search call. Tensors needing gradients
    (training) are never cached.
    """
    key = (M.device, M.data_ptr(), M._version, tuple(M.shape), M.dtype)
    if not M.requires_grad and key in _NULL_CACHE:
        return _NULL_CACHE[key][1]
    out = _null_space(M.detach().cpu())
    out = (out[0].to(M.device), out[1].to(M.device))
    if not M.requires_grad:
        if len(_NULL_CACHE) > 16:
            _NULL_CACHE.clear()
        # the entry holds M itself: its address cannot be reused by another matrix while cached
        _NULL_CACHE[key] = (M.detach(), out)
    return out


def _null_space(M: Tensor) -> tuple[Tensor, Tensor]:
    """Pseudo-inverse and a *canonical* null-space basis.

    The heuristic's candidate set depends on which orthonormal basis of ker(M) is used, and an
    SVD leaves that basis implementation-defined (LAPACK and cuSOLVER differ), so N is built
    deterministically: Householder QR of the null-space projector ``I - M_pinv M`` with the
    signs fixed so that diag(R) > 0; its first D - d columns span ker(M).
    """
    d, D = M.shape
    Md = M.double()
    S = torch.linalg.svdvals(Md)
    if S.min() <= S.max() * 1e-10:
        raise ValueError("lattice matrix M is rank deficient; it cannot decode d dimensions")
    M_pinv = torch.linalg.pinv(Md)  # (D, d)
    Q = positive_qr(torch.eye(D, dtype=torch.float64) - M_pinv @ Md)
    N = Q[:, : D - d].T  # (D - d, D)
    return M_pinv.to(M.dtype), N.to(M.dtype)


def null_bases(M: Tensor, n: int) -> list[Tensor]:
    """``n`` orthonormal bases of ker(M): the canonical one, then fixed seeded rotations of it.

    Each basis gives a different candidate set ``sign(M_pinv z + N^T p)``; searching their
    union finds closer codes (20to8 with 4 bases: nearly the exhaustive search's MSE, rows in
    bench/lattice/lattice.csv) at n times the cost.
    """
    _, N = null_space(M)
    out = [N]
    k = N.shape[0]
    for b in range(1, n):
        Q = random_orthogonal(k, seed=BASIS_SEED + b, dtype=torch.float64)
        out.append(Q.to(N.device, N.dtype) @ N)
    return out


def padding_offsets(M: Tensor, *, bases: int = 1) -> Tensor:
    """``N^T p`` for every padding ``p in {-1,+1}^(D-d)`` and each of ``bases`` null-space
    bases (``null_bases``): a (bases * 2^(D-d), D) tensor."""
    P = all_codes(M.shape[1] - M.shape[0], device=M.device, dtype=M.dtype)  # (2^(D-d), D-d)
    return torch.cat([P @ N for N in null_bases(M, bases)])  # (bases * 2^(D-d), D)


def decode(signs: Tensor, M: Tensor) -> Tensor:
    """``M y`` for codes ``signs`` (..., D) of +-1 -> (..., d)."""
    return signs.to(M.dtype) @ M.T


def _chunk_rows(n_rows: int, per_row: int) -> int:
    return max(1, min(n_rows, MAX_CHUNK_ELEMENTS // max(1, per_row)))


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------
def _search_exhaustive(z: Tensor, M: Tensor) -> Tensor:
    """Exact nearest code for each row of z (B, d). Returns (B, D) float +-1."""
    D = M.shape[1]
    best_score = torch.full((z.shape[0],), float("inf"), device=z.device, dtype=z.dtype)
    best_code = torch.zeros(z.shape[0], D, device=z.device, dtype=z.dtype)
    c = z @ M  # (B, D): M^T z per row
    code_chunk = min(1 << D, 1 << 20)
    rows = _chunk_rows(z.shape[0], code_chunk)
    for start in range(0, 1 << D, code_chunk):
        idx = torch.arange(start, min(start + code_chunk, 1 << D), device=z.device)
        codes = codes_from_index(idx, D, dtype=z.dtype)
        q = (codes @ M.T).square().sum(-1)  # (C,) ||M y||^2
        codes_t = codes.T.contiguous()  # (D, C)
        for r0 in range(0, z.shape[0], rows):
            score = torch.addmm(q, c[r0 : r0 + rows], codes_t, alpha=-2.0)  # (b, C), one pass
            val, arg = score.min(dim=1)
            better = val < best_score[r0 : r0 + rows]
            best_score[r0 : r0 + rows] = torch.where(better, val, best_score[r0 : r0 + rows])
            best_code[r0 : r0 + rows][better] = codes[arg[better]]
    return best_code


def _search_pinv(z: Tensor, M: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Published heuristic: best of sign(M_pinv z + N^T p) over all paddings p.

    Returns ``(codes (B, D) +-1, pre_sign (B, D))`` where ``pre_sign`` is the real-valued
    vector whose sign gave the code (useful to initialise latent weights).
    """
    M_pinv, _ = null_space(M)
    u = z @ M_pinv.T  # (B, D)
    n_off, D = offsets.shape
    rows = _chunk_rows(z.shape[0], n_off * D)
    codes = torch.empty_like(u)
    pre = torch.empty_like(u)
    for r0 in range(0, z.shape[0], rows):
        v = u[r0 : r0 + rows, None, :] + offsets[None]  # (b, P, D)
        y = torch.where(v >= 0, 1.0, -1.0).to(z.dtype)
        dist = (y @ M.T - z[r0 : r0 + rows, None, :]).square().sum(-1)  # (b, P)
        arg = dist.argmin(dim=1)
        sel = torch.arange(arg.shape[0], device=z.device)
        codes[r0 : r0 + rows] = y[sel, arg]
        pre[r0 : r0 + rows] = v[sel, arg]
    return codes, pre


def refine_flips(z: Tensor, codes: Tensor, M: Tensor, *, max_iters: int | None = None) -> Tensor:
    """Greedy single-bit-flip descent: flip the best bit while it lowers ||z - M y||^2.

    Flipping bit j changes the residual r = z - M y by +2 y_j m_j, so the distance changes by
    ``4 (y_j m_j . r + ||m_j||^2)``: all D deltas cost one (B, d) x (d, D) product.
    """
    y = codes.clone()
    col_sq = M.square().sum(0)  # (D,) ||m_j||^2
    for _ in range(max_iters or M.shape[1]):
        r = z - y @ M.T  # (B, d)
        delta = 4.0 * (y * (r @ M) + col_sq)  # (B, D)
        val, j = delta.min(dim=1)
        improve = val < -1e-7
        if not bool(improve.any()):
            break
        rows = improve.nonzero().squeeze(1)
        y[rows, j[rows]] = -y[rows, j[rows]]
    return y


def _use_triton(kernel: str, z: Tensor) -> bool:
    if kernel == "torch":
        return False
    if kernel == "triton":
        return True
    if kernel != "auto":
        raise ValueError(f"unknown search kernel {kernel!r}: use auto|torch|triton")
    if not z.is_cuda:
        return False
    from liftquant.kernels.search import HAS_TRITON

    return HAS_TRITON


_TRITON_FAILED: list[str] = []


def _with_triton_fallback(kernel: str, z: Tensor, triton_fn, torch_fn, *, what: str):
    """Run ``triton_fn()`` when the fused kernel is asked for or available, else ``torch_fn()``.

    With ``kernel="auto"`` a kernel that cannot be built on this machine falls back to torch,
    warning once with the reason; ``kernel="triton"`` re-raises instead.
    """
    if _use_triton(kernel, z) and not (kernel == "auto" and _TRITON_FAILED):
        try:
            return triton_fn()
        except Exception as exc:
            if kernel == "triton":
                raise
            _TRITON_FAILED.append(repr(exc))
            logger.warning("Triton %s kernel unavailable (%r); using torch", what, exc)
    return torch_fn()


def _exhaustive_dispatch(z: Tensor, M: Tensor, kernel: str) -> Tensor:
    from liftquant.kernels.search import search_exhaustive_triton

    return _with_triton_fallback(kernel, z, lambda: search_exhaustive_triton(z, M),
                                 lambda: _search_exhaustive(z, M), what="exhaustive search")


def _pinv_dispatch(z: Tensor, M: Tensor, off: Tensor, kernel: str) -> tuple[Tensor, Tensor]:
    from liftquant.kernels.search import search_pinv_triton

    return _with_triton_fallback(kernel, z, lambda: search_pinv_triton(z, M, off),
                                 lambda: _search_pinv(z, M, off), what="pinv search")


def encode(
    w: Tensor,
    M: Tensor,
    *,
    method: str = "auto",
    refine: bool | None = None,
    return_pre_sign: bool = False,
    offsets: Tensor | None = None,
    kernel: str = "auto",
    bases: int | None = None,
):
    """Nearest lattice codes for sub-vectors ``w`` (..., d) under ``M`` (d, D).

    Returns int8 codes of +-1 with shape (..., D); with ``return_pre_sign`` also a float
    tensor (..., D) whose signs are the codes and whose magnitudes tell how confident each
    bit is (the pinv candidate before ``sign``; for exhaustive codes the projection
    ``M_pinv z`` nudged to agree in sign). ``method``: "auto", "exhaustive", "pinv" or
    ``kernel`` picks the pinv implementation: "auto" (the fused Triton kernel for CUDA inputs
    when Triton is importable, else torch), "torch" or "triton". ``refine`` defaults to True.
    ``bases``: pinv searches the union of the candidates of this many null-space bases
    (default: :func:`search_bases` of the lattice; ignored when ``offsets`` is given).
    """
    d, D = M.shape
    if w.shape[-1] != d:
        raise ValueError(f"encode: last dim {w.shape[-1]} != lattice target_dim {d}")
    if method == "auto":
        method = LatticeSpec(D, d).default_method(w.device.type)
    lead = w.shape[:-1]
    z = w.reshape(-1, d).to(M.dtype)  # (B, d)
    Mw = M.to(z.device)
    if method == "exhaustive":
        codes = _exhaustive_dispatch(z, Mw, kernel)
        pre = None
    elif method == "pinv":
        if offsets is None:
            offsets = padding_offsets(Mw, bases=bases or search_bases(D, d))
        off = offsets
        codes, pre = _pinv_dispatch(z, Mw, off.to(z.device), kernel)
        if refine is None or refine:
            codes = refine_flips(z, codes, Mw)
    else:
        raise ValueError(f"unknown search method {method!r}: use auto|exhaustive|pinv")
    if return_pre_sign:
        if pre is None:
            M_pinv, _ = null_space(Mw)
            pre = z @ M_pinv.T
        # make the magnitudes agree with the final codes (flipped bits keep a small margin)
        pre = codes * pre.abs().clamp_min(PRE_SIGN_FLOOR)
        return codes.to(torch.int8).reshape(*lead, D), pre.reshape(*lead, D)
    return codes.to(torch.int8).reshape(*lead, D)


# Sub-vectors per search call in encode_candidates: bounds the (rows, D) float temporaries
# (u, pre_sign) to ~400 MiB each at D = 24 while keeping every launch large.
ENCODE_CHUNK_ROWS = 1 << 22


def encode_candidates(
    z: Tensor,
    M: Tensor,
    *,
    method: str = "auto",
    margin: float = math.inf,
    chunk_rows: int = ENCODE_CHUNK_ROWS,
    kernel: str = "auto",
    bases: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest codes for rows of ``z`` (B, d) plus the latent weights that may still flip.

    The search runs ``chunk_rows`` sub-vectors at a time (one call for all linears of a block),
    so only int8 codes (B, D) and the candidates are kept: ``cand_idx`` (int64, flat indices
    into the (B, D) codes) and ``cand_pre`` (float32), the pre-sign values with
    ``|pre| <= margin`` (:func:`encode` with ``return_pre_sign``).
    """
    d, D = M.shape
    if method == "auto":
        method = LatticeSpec(D, d).default_method(z.device.type)
    Mw = M.to(z.device, torch.float32)
    off = padding_offsets(Mw, bases=bases or search_bases(D, d)) if method == "pinv" else None
    B = z.shape[0]
    codes = torch.empty(B, D, dtype=torch.int8, device=z.device)
    idx_parts, val_parts = [], []
    for r0 in range(0, B, chunk_rows):
        c, pre = encode(z[r0:r0 + chunk_rows], Mw, method=method, return_pre_sign=True,
                        offsets=off, kernel=kernel)
        codes[r0:r0 + c.shape[0]] = c
        flat = pre.reshape(-1)
        loc = (flat.abs() <= margin).nonzero().squeeze(1)
        idx_parts.append(loc + r0 * D)
        val_parts.append(flat[loc].float())
        del c, pre, flat
    return codes, torch.cat(idx_parts), torch.cat(val_parts)


def quantization_mse(z: Tensor, M: Tensor, **encode_kwargs) -> float:
    """Per-dimension MSE of encoding rows of z (B, d) with M."""
    codes = encode(z, M, **encode_kwargs)
    return float((z - decode(codes, M.to(z.device))).square().mean())


def gaussian_mse(
    M: Tensor,
    *,
    n: int = 100_000,
    seed: int = 1234,
    method: str = "auto",
    refine: bool | None = None,
    device=None,
    batch: int = 1 << 16,
    kernel: str = "auto",
    bases: int | None = None,
) -> float:
    """Per-dimension MSE of M on ``n`` fresh N(0, I_d) vectors with the given search."""
    device = torch.device(device) if device is not None else M.device
    Md = M.to(device).float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if method == "auto":
        method = LatticeSpec(Md.shape[1], Md.shape[0]).default_method(device.type)
    bases = bases or search_bases(Md.shape[1], Md.shape[0])
    off = padding_offsets(Md, bases=bases) if method == "pinv" else None
    total, count = 0.0, 0
    for start in range(0, n, batch):
        b = min(batch, n - start)
        z = torch.randn(b, Md.shape[0], generator=gen).to(device)
        codes = encode(z, Md, method=method, refine=refine, offsets=off, kernel=kernel)
        total += float((z - decode(codes, Md)).square().sum())
        count += z.numel()
    return total / count


def rate_distortion_bound(bits: float) -> float:
    """Gaussian rate-distortion limit D(R) = 2^(-2R) per dimension."""
    return 2.0 ** (-2.0 * bits)


def sign_quantization_mse() -> float:
    """MSE of the naive 1-bit quantizer z -> sqrt(2/pi) sign(z) on N(0,1): 1 - 2/pi."""
    return 1.0 - 2.0 / math.pi
