"""Hadamard matrices and orthogonal initialisations for the whitening factors P1, P2 (Eq. 2).

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H @ H.T == n * I``. The whitening
transform T (paper Eq. 2, :mod:`liftquant.core.whiten`) starts its orthogonal factors from
``H / sqrt(n)``: a dense rotation that spreads outliers evenly over a row.

Orders are built, never stored:

* Sylvester: ``H_1 = [1]``, ``H_{2m} = [[H_m, H_m], [H_m, -H_m]]`` gives every power of two.
* Paley I: ``q`` prime, ``q = 3 (mod 4)`` gives order ``q + 1`` (4, 8, 12, 20, 24, 32, 44, 48,
  60, 68, 72, 80, 84, 104, 108, 128, 132, 140, ...).
* Paley II: ``q`` prime, ``q = 1 (mod 4)`` gives order ``2 (q + 1)`` (12, 28, 36, 60, 76, 84,
  108, 124, 148, ...).
* Kronecker products: ``H_{2^k m} = H_{2^k} (x) H_m`` for any base order ``m`` above.

Together these cover 1, 2 and every multiple of 4 below 100 except 52 and 92; among larger
orders e.g. 100, 116, 156 and 172 are missing (they need prime-power fields or Williamson
matrices), and so are their multiples by powers of two unless another route reaches them.
For an order without a Hadamard matrix :func:`orthogonal_init` falls back to the orthonormal
DCT-II basis.

Legend: ``n`` order, ``q`` prime, ``chi`` the quadratic character (Legendre symbol) mod q,
``Q`` (q, q) Jacobsthal matrix ``Q[i, j] = chi(j - i)``, ``J`` all-ones, ``H`` Hadamard matrix.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# How many cached full-size matrices to keep (int8, so 16 of order 4096 cost 256 MiB at most).
FULL_CACHE_SIZE = 16
# How far the "nearby supported orders" hint in error messages looks on either side of n.
SUGGESTION_WINDOW = 64
ORTHOGONAL_KINDS = ("hadamard", "identity", "random", "dct")


@functools.cache
def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % f for f in range(3, math.isqrt(q) + 1, 2))


def _paley_prime(m: int) -> tuple[int, int] | None:
    """(construction, q) building a Hadamard matrix of order ``m`` by Paley I / II, else None."""
    q = m - 1
    if q % 4 == 3 and _is_prime(q):
        return 1, q
    if m % 2 == 0:
        q = m // 2 - 1
        if q % 4 == 1 and _is_prime(q):
            return 2, q
    return None


@functools.cache
def _decompose(n: int) -> tuple[int, int] | None:
    """``(2^k, m)`` with ``n = 2^k * m`` and ``m == 1`` or a Paley order; largest 2^k first."""
    if n < 1 or (n > 2 and n % 4):
        return None
    power = 1 << ((n & -n).bit_length() - 1)  # largest power of two dividing n
    while power >= 1:
        m = n // power
        if m == 1 or _paley_prime(m) is not None:
            return power, m
        power //= 2
    return None


def has_hadamard(n: int) -> bool:
    """Whether :func:`hadamard` can build an order-``n`` matrix (see the module docstring)."""
    return _decompose(int(n)) is not None


def _quadratic_character(q: int) -> Tensor:
    """``chi[a]`` for a in [0, q): 0 at 0, +1 on nonzero squares mod q, -1 elsewhere (int8)."""
    chi = torch.full((q,), -1, dtype=torch.int8)
    squares = (torch.arange(1, q, dtype=torch.int64) ** 2) % q
    chi[squares] = 1
    chi[0] = 0
    return chi


def _jacobsthal(q: int) -> Tensor:
    """(q, q) int8 matrix ``Q[i, j] = chi(j - i mod q)``; skew for q = 3, symmetric for 1 mod 4."""
    chi = _quadratic_character(q)
    windows = torch.cat([chi, chi]).unfold(0, q, 1)  # (q + 1, q): windows[k, j] = chi[(k + j) % q]
    rows = (q - torch.arange(q)) % q  # row i starts at offset -i
    return windows[rows]


@functools.cache
def _paley(m: int) -> Tensor:
    """Order-``m`` Hadamard matrix from Paley I or II (int8, cached, never handed out)."""
    construction, q = _paley_prime(m)  # type: ignore[misc]
    Q = _jacobsthal(q)
    ones = torch.ones(q, dtype=torch.int8)
    if construction == 1:
        # S = [[0, 1^T], [-1, Q]] is skew with S S^T = q I, so H = I + S has H H^T = (q + 1) I.
        S = torch.zeros(q + 1, q + 1, dtype=torch.int8)
        S[0, 1:] = ones
        S[1:, 0] = -ones
        S[1:, 1:] = Q
        return S + torch.eye(q + 1, dtype=torch.int8)
    # C = [[0, 1^T], [1, Q]] is a symmetric conference matrix (C C^T = q I, zero diagonal);
    # replacing each 0 by [[1, 1], [1, -1]] and each +-1 by +-[[1, -1], [-1, -1]] gives H.
    C = torch.zeros(q + 1, q + 1, dtype=torch.int8)
    C[0, 1:] = ones
    C[1:, 0] = ones
    C[1:, 1:] = Q
    off = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int8)
    diag = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    return torch.kron(C, off) + torch.kron(torch.eye(q + 1, dtype=torch.int8), diag)


@functools.cache
def _sylvester(n: int) -> Tensor:
    """Order-``n`` (power of two) Sylvester matrix, int8, cached."""
    H = torch.ones(1, 1, dtype=torch.int8)
    base = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    while H.shape[0] < n:
        H = torch.kron(base, H)
    return H


@functools.lru_cache(maxsize=FULL_CACHE_SIZE)
def _hadamard_int8(n: int) -> Tensor:
    power, m = _decompose(n)  # type: ignore[misc]
    if m == 1:
        return _sylvester(power)
    return torch.kron(_sylvester(power), _paley(m))


def _nearby_orders(n: int) -> list[int]:
    lo = [k for k in range(max(n - SUGGESTION_WINDOW, 1), n) if has_hadamard(k)]
    hi = [k for k in range(n + 1, n + SUGGESTION_WINDOW + 1) if has_hadamard(k)]
    return lo[-2:] + hi[:2]


def hadamard(n: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """An ``n x n`` Hadamard matrix ``H`` (entries +-1, ``H @ H.T == n * I``), unnormalised.

    Sylvester for powers of two, otherwise ``H_{2^k} (x) H_m`` with ``m`` a Paley order
    (largest power of two first). The construction is cached; every call returns a fresh
    tensor, so the caller may modify it freely.

    Raises:
        ValueError: if no construction here reaches order ``n`` (the message lists nearby
            orders that work; :func:`orthogonal_init` covers every ``n``).
    """
    n = int(n)
    if not has_hadamard(n):
        raise ValueError(
            f"no Hadamard matrix of order {n} is available (supported: 1, 2 and 2^k * m with m a "
            f"Paley order, e.g. {_nearby_orders(n)} near {n}); use "
            f"orthogonal_init({n}) for a DCT-based orthogonal matrix of any order"
        )
    return _hadamard_int8(n).to(dtype, copy=True)


def dct_matrix(n: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthonormal DCT-II matrix: row k is ``sqrt(2/n) cos(pi (i + 1/2) k / n)`` (row 0 scaled
    by ``1/sqrt(2)``), so ``C @ C.T == I``."""
    i = torch.arange(n, dtype=torch.float64)
    C = torch.cos(math.pi * (i[None, :] + 0.5) * i[:, None] / n) * math.sqrt(2.0 / n)  # (n, n)
    C[0] /= math.sqrt(2.0)
    return C.to(dtype)


def positive_qr(A: Tensor) -> Tensor:
    """Q of the QR decomposition of ``A`` with columns sign-fixed so that diag(R) >= 0.

    This makes Q a function of A alone, whichever LAPACK produced the factorisation.
    """
    Q, R = torch.linalg.qr(A)
    return Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q)[None, :]


def random_orthogonal(n: int, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Haar-random orthogonal matrix: QR of a seeded Gaussian with the signs of diag(R) fixed."""
    gen = torch.Generator().manual_seed(seed)
    return positive_qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).to(dtype)


def orthogonal_init(
    n: int, *, kind: str = "hadamard", seed: int = 0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """An ``n x n`` orthonormal matrix to start a whitening factor from.

    kind:
        ``"hadamard"``: ``H / sqrt(n)`` when :func:`has_hadamard` ``(n)``, else the orthonormal
            DCT-II matrix. The DCT is the fallback because it is deterministic, defined for
            every ``n``, dense (every output mixes every input, row 0 is the flat average just
            like a Hadamard row) and exactly orthogonal, so it spreads outliers the way a
            Hadamard rotation does.
        ``"dct"``: always the DCT-II matrix.
        ``"identity"``: ``I`` (no rotation).
        ``"random"``: a seeded Haar-random orthogonal matrix (:func:`random_orthogonal`).
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"order must be >= 1, got {n}")
    if kind == "hadamard":
        if has_hadamard(n):
            return (_hadamard_int8(n).to(torch.float64) / math.sqrt(n)).to(dtype)
        return dct_matrix(n, dtype=dtype)
    if kind == "dct":
        return dct_matrix(n, dtype=dtype)
    if kind == "identity":
        return torch.eye(n, dtype=dtype)
    if kind == "random":
        return random_orthogonal(n, seed=seed, dtype=dtype)
    raise ValueError(f"unknown orthogonal init kind {kind!r}; expected one of {ORTHOGONAL_KINDS}")
