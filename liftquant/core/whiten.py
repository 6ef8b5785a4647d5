"""Kronecker whitening transform T (paper Eq. 2) and its fused inference form T* (Eq. 4).

A linear layer's weight ``W`` (out x n) is quantized row by row in sub-vectors of length ``d``.
Before that, every row is reshaped by the invertible, cheap transform::

    T = diag(s1) . (P1 (x) P2) . diag(s2)                                          (Eq. 2)

acting on rows (``W_t = pad(W) @ T``): the ``n`` input features are zero-padded to
``n1 * n2``, a row is viewed row-major as an ``n1 x n2`` matrix ``X`` and the Kronecker
product is applied as ``P1^T X P2`` (cost O(n (n1 + n2)), not O(n^2)). Activations get the
inverse, ``x_t = T^{-1} x``, so ``W_t @ x_t == W @ x``.

At inference the lattice matrix M (d x D) is folded in (Eq. 4)::

    T* = M_blk^T . T^{-1},   M_blk = blockdiag(M, ..., M)   (n_pad x n_pad D / d)

    x  ->  Xs = pad(x) / s1 viewed (n1, n2)  ->  H = L Xs R  ->  H / s2 per lifted chunk

with ``L = P1^T`` (n1 x n1) and ``R = P2 blockdiag(M x n2/d)`` (n2 x (n2/d) D): two small
dense matmuls (:func:`apply_fused`).

Legend: ``n`` in_features, ``d`` target (sub-vector) dim, ``D`` lifted dim, ``(n1, n2)`` the
block shape (``n2 % d == 0``), ``n_pad = n1 n2``, ``s1`` (n,) per input channel, ``s2``
(n1, n2/d) per d-chunk of the ``n1 x n2`` view (chunk ``(i, j) = X[i, j d:(j+1) d]``),
``P1`` (n1, n1) and ``P2`` (n2, n2) orthogonal, ``P0`` their initial value, ``A`` a
skew-symmetric generator, ``M`` (d, D) lattice matrix, ``L``/``R`` the fused factors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liftquant.core.hadamard import has_hadamard, orthogonal_init

# Hadamard factors are only preferred among shapes whose cost n1 + n2 is within this factor of
# the most balanced minimal-padding shape. Without the bound e.g. 11008 = 2 x 5504 (both
# Hadamard orders) would beat 86 x 128 and P2 / the fused R would have 5504^2 entries.
HADAMARD_COST_SLACK = 1.5


# Block-shape rules. A checkpoint records the rule its layers were built with
# ("whiten.block_shape/<rule>"); loading rebuilds the layers with that rule.
BLOCK_SHAPE_RULES = ("v1", "v2")
DEFAULT_BLOCK_SHAPE_RULE = "v2"
# v2 keeps v1's shape unless its cost n1 + n2 exceeds this factor of 2 sqrt(n1 n2) (a square's)
# and then allows up to PAD_FRACTION * n extra padded columns (at least d) to find a better one.
BALANCE_SLACK = 1.5
PAD_FRACTION = 0.01


def _shapes(n_pad: int, d: int) -> list[tuple[int, int]]:
    return [(n_pad // n2, n2) for n2 in range(d, n_pad + 1, d) if n_pad % n2 == 0]


def _best_shape(shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """v1's preference among ``shapes``: Hadamard pairs within the cost slack, then the most
    balanced, then the least padding, then the smaller ``n2``."""
    budget = HADAMARD_COST_SLACK * min(n1 + n2 for n1, n2 in shapes)

    def key(shape: tuple[int, int]) -> tuple[bool, int, int, int]:
        n1, n2 = shape
        hadamard_pair = n1 + n2 <= budget and has_hadamard(n1) and has_hadamard(n2)
        return (not hadamard_pair, n1 + n2, n1 * n2, n2)

    return min(shapes, key=key)


@functools.cache
def block_shape(in_features: int, d: int, rule: str = DEFAULT_BLOCK_SHAPE_RULE) -> tuple[int, int]:
    """The rule for the Kronecker factorisation ``(n1, n2)`` of a row of length ``n``.

    Guarantees ``n2 % d == 0`` and ``n1 * n2 >= n``; padding is ``n1 * n2 - n``. Rule, in order:

    1. minimal padding: ``n1 * n2 = ceil(n / d) * d`` (zero padding whenever ``d | n``);
    2. among those, with cost ``n1 + n2`` at most ``HADAMARD_COST_SLACK`` times the cheapest,
       prefer both ``n1`` and ``n2`` having a Hadamard matrix (:func:`has_hadamard`);
    3. then the most balanced (minimal ``n1 + n2``, i.e. ``|log(n1 / n2)|``);
    4. ties go to the smaller ``n2`` (the fused right factor R is ``n2 x n2 D / d``).

    Examples (``(n, d) -> (n1, n2)``, padding 0 unless stated)::

        (576, 8)   -> (24, 24)        (1536, 8)  -> (48, 32)       (4096, 8)  -> (64, 64)
        (11008, 8) -> (86, 128)       (4096, 10) -> (82, 50) pad 4 (14336, 14) -> (128, 112)
        (896, 10)  -> (30, 30) pad 4  (4864, 8)  -> (76, 64)       (13824, 8) -> (108, 128)

    Examples with ``d = 8`` all land on Hadamard pairs except 11008 (86 is not a Hadamard
    order, P1 starts from the DCT); ``d = 10`` sizes need padding and DCT factors.

    Rule ``v2`` (the default since checkpoints record their rule) is ``v1`` unless that shape
    is badly unbalanced (``n1 + n2 > BALANCE_SLACK * 2 sqrt(n1 n2)``). Then it also considers
    paddings up to ``max(d, PAD_FRACTION * n)`` columns more and applies rules 2-4 to all of
    them (ties: less padding). Example: (4864, 10) is 487 x 10 under v1, a 487 x 487 left
    factor, and 70 x 70 (36 padded columns) under v2. ``rule="v1"`` rebuilds old checkpoints.
    """
    n, d = int(in_features), int(d)
    if n < 1 or d < 1:
        raise ValueError(f"in_features and d must be >= 1, got {n}, {d}")
    if rule not in BLOCK_SHAPE_RULES:
        raise ValueError(f"unknown block-shape rule {rule!r}: one of {BLOCK_SHAPE_RULES}")
    n_pad = -(-n // d) * d  # smallest multiple of d >= n: the minimal padded size
    n1, n2 = _best_shape(_shapes(n_pad, d))
    if rule == "v1" or n1 + n2 <= BALANCE_SLACK * 2 * (n1 * n2) ** 0.5:
        return n1, n2
    extra = max(d, int(PAD_FRACTION * n))
    sizes = range(n_pad, n_pad + extra + 1, d)
    return _best_shape([shape for size in sizes for shape in _shapes(size, d)])


def padded_in_features(in_features: int, d: int, rule: str = DEFAULT_BLOCK_SHAPE_RULE) -> int:
    """``n1 * n2`` of :func:`block_shape`: the row length after padding."""
    n1, n2 = block_shape(in_features, d, rule)
    return n1 * n2


def _pad_ones(s1: Tensor, n_pad: int) -> Tensor:
    """s1 (n,) -> (n_pad,), padded positions scale by 1."""
    return F.pad(s1, (0, n_pad - s1.shape[-1]), value=1.0)


def cayley(P0: Tensor, S: Tensor) -> Tensor:
    """``P0 (I - A)(I + A)^{-1}`` with ``A = S - S^T``: orthogonal for every ``S`` if P0 is.

    ``I + A`` is always invertible (eigenvalues ``1 + i lambda``) and ``(I - A)`` commutes with
    ``(I + A)^{-1}``, so the product is computed as one solve ``(I + A)^{-1} (I - A)``. The solve
    is ``solve_ex`` (same LU, no error check): ``solve`` would wait on the device for its
    singularity flag in every call, hundreds of times per step in an MoE block. Leading dims
    of ``P0``/``S`` (..., k, k) are a batch (one batched solve for a stack of factors).
    """
    work = torch.float32 if S.dtype in (torch.float16, torch.bfloat16) else S.dtype  # no half LU
    A = (S - S.mT).to(work)
    eye = torch.eye(S.shape[-1], dtype=work, device=S.device)
    return (P0.to(work) @ torch.linalg.solve_ex(eye + A, eye - A)[0]).to(S.dtype)


def batched_factors(whitens: list[KronWhitening]) -> list[tuple[Tensor, Tensor]]:
    """``[w.factors() for w in whitens]`` with one batched Cayley solve per factor shape.

    A dense block's linears share a few factor sizes (every linear with the same in_features
    has the same ``n1``, ``n2``), so the 2 x (layers) small solves of a stage-1 step, and their
    backward solves, become one per size: on a GPU each small solve costs far more in launches
    and dispatch than in arithmetic. The factors are ``torch.stack``-ed, so each whitening's
    own skew gets its gradient. Values equal the one-by-one factors to float32 rounding.
    """
    items = [(w.P1_init, w.P1_skew) for w in whitens] + [(w.P2_init, w.P2_skew) for w in whitens]
    groups: dict[tuple, list[int]] = {}
    for i, (P0, S) in enumerate(items):
        groups.setdefault((tuple(S.shape), S.dtype, P0.dtype, S.device), []).append(i)
    out: list[Tensor | None] = [None] * len(items)
    for idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = cayley(*items[idx[0]])
            continue
        Q = cayley(torch.stack([items[i][0] for i in idx]), torch.stack([items[i][1] for i in idx]))
        for j, i in enumerate(idx):
            out[i] = Q[j]
    n = len(whitens)
    return [(out[k], out[n + k]) for k in range(n)]


def apply_fused(
    x: Tensor, *, s1: Tensor, L: Tensor, R: Tensor, s2_act: Tensor, d: int, D: int
) -> Tensor:
    """Fused inference transform ``T* x`` (Eq. 4): (..., n) -> (..., n1 * (n2 / d) * D).

    ``s1`` (n,), ``L`` (n1, n1), ``R`` (n2, (n2 / d) D), ``s2_act`` (n1, n2 / d, 1). Equals
    ``forward_input(x)`` cut into d-chunks, each chunk ``c`` mapped to ``M^T c``.
    """
    n1, n2 = L.shape[0], R.shape[0]
    if n2 % d or R.shape[1] != (n2 // d) * D or s1.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"inconsistent fused shapes: x {tuple(x.shape)}, s1 {tuple(s1.shape)}, "
            f"L {tuple(L.shape)}, R {tuple(R.shape)}, d={d}, D={D}"
        )
    lead = x.shape[:-1]
    # side tensors follow the activation dtype (float32 masters are cast, gradients flow back)
    xs = F.pad(x, (0, n1 * n2 - x.shape[-1])) / _pad_ones(s1, n1 * n2).to(x.dtype)  # (.., n_pad)
    H = L @ xs.reshape(*lead, n1, n2) @ R  # (..., n1, (n2 / d) D)
    H = H.reshape(*lead, n1, n2 // d, D) * s2_act.to(H.dtype)  # (..., n1, n2 / d, D)
    return H.reshape(*lead, n1 * (n2 // d) * D)


class KronWhitening(nn.Module):
    """``T = diag(s1) (P1 (x) P2) diag(s2)`` (Eq. 2) on weight rows, P1/P2 Cayley-orthogonal.

    ``P_k = P0_k (I - A_k)(I + A_k)^{-1}`` with ``A_k = S_k - S_k^T``; ``S_k`` (parameters
    ``P1_skew``/``P2_skew``) start at zero, so ``P_k`` starts at the orthogonal init ``P0_k``
    (buffers ``P1_init``/``P2_init``) and stays exactly orthogonal under any gradient step.
    ``s1`` (n,) and ``s2`` (n1, n2 / d) are plain parameters initialised to one; they must stay
    nonzero (the transform divides by them).

    ``forward`` is :meth:`forward_weight`. ``apply(W)`` is an alias of it too, but
    ``apply(fn)`` with a callable keeps ``nn.Module.apply`` semantics (recursive init).
    """

    def __init__(
        self,
        in_features: int,
        d: int,
        *,
        init: str = "hadamard",
        learn_P: bool = True,
        learn_s1: bool = True,
        learn_s2: bool = True,
        dtype: torch.dtype = torch.float32,
        block_rule: str = DEFAULT_BLOCK_SHAPE_RULE,
    ) -> None:
        super().__init__()
        self.in_features, self._d = int(in_features), int(d)
        self.block_rule = block_rule
        self.n1, self.n2 = block_shape(self.in_features, self._d, block_rule)
        self.init_kind = init
        self.s1 = nn.Parameter(torch.ones(self.in_features, dtype=dtype), requires_grad=learn_s1)
        self.s2 = nn.Parameter(
            torch.ones(self.n1, self.n2 // self._d, dtype=dtype), requires_grad=learn_s2
        )
        self.register_buffer("P1_init", orthogonal_init(self.n1, kind=init, seed=1, dtype=dtype))
        self.register_buffer("P2_init", orthogonal_init(self.n2, kind=init, seed=2, dtype=dtype))
        self.P1_skew = nn.Parameter(
            torch.zeros(self.n1, self.n1, dtype=dtype), requires_grad=learn_P
        )
        self.P2_skew = nn.Parameter(
            torch.zeros(self.n2, self.n2, dtype=dtype), requires_grad=learn_P
        )

    # ----------------------------------------------------------------- shapes and factors
    @property
    def d(self) -> int:
        return self._d

    @property
    def block_shape(self) -> tuple[int, int]:
        return self.n1, self.n2

    @property
    def padded_in_features(self) -> int:
        return self.n1 * self.n2

    def P1(self) -> Tensor:
        """Current left factor (n1, n1), exactly orthogonal."""
        return cayley(self.P1_init, self.P1_skew)

    def P2(self) -> Tensor:
        """Current right factor (n2, n2), exactly orthogonal."""
        return cayley(self.P2_init, self.P2_skew)

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(P1, P2)``, to pass to several transforms of one step instead of re-solving them."""
        return self.P1(), self.P2()

    @torch.no_grad()
    def set_s1(self, s1: Tensor) -> None:
        """Set the per-input-channel scale (e.g. from activation statistics); must be nonzero."""
        if s1.shape != self.s1.shape:
            raise ValueError(f"s1 must have shape {tuple(self.s1.shape)}, got {tuple(s1.shape)}")
        if not torch.isfinite(s1).all() or (s1 == 0).any():
            raise ValueError("s1 must be finite and nonzero")
        self.s1.copy_(s1.to(self.s1))

    def _s2_full(self) -> Tensor:
        """s2 broadcast to (n1, n2/d, 1) for chunked views."""
        return self.s2.unsqueeze(-1)

    # ----------------------------------------------------------------------- transforms
    def _rotate(self, X: Tensor, *, inverse: bool,
                factors: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(..., n_pad) -> (..., n_pad): ``P1^T X P2`` (or ``P1 X P2^T``) on the n1 x n2 view."""
        P1, P2 = factors if factors is not None else self.factors()
        if inverse:
            P1, P2 = P1.T, P2.T
        lead = X.shape[:-1]
        X = P1.T @ X.reshape(*lead, self.n1, self.n2) @ P2  # (..., n1, n2)
        return X.reshape(*lead, self.padded_in_features)

    def _scale_chunks(self, X: Tensor, *, divide: bool) -> Tensor:
        """Multiply (or divide) every d-chunk of (..., n_pad) by its s2."""
        lead = X.shape[:-1]
        Xc = X.reshape(*lead, self.n1, self.n2 // self._d, self._d)  # (..., n1, n2/d, d)
        Xc = Xc / self._s2_full() if divide else Xc * self._s2_full()
        return Xc.reshape(*lead, self.padded_in_features)

    def _check_in(self, x: Tensor, size: int, what: str) -> None:
        if x.shape[-1] != size:
            raise ValueError(f"{what} must have last dim {size}, got shape {tuple(x.shape)}")

    def forward_weight(self, W: Tensor, *, factors: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``W_t = pad(W) @ T``: (..., n) -> (..., n1 n2). Pad, * s1, P1^T X P2, * s2.
        ``factors``: :meth:`factors` computed once for several transforms (default: now)."""
        self._check_in(W, self.in_features, "W")
        n_pad = self.padded_in_features
        X = F.pad(W, (0, n_pad - self.in_features)) * _pad_ones(self.s1, n_pad)
        return self._scale_chunks(self._rotate(X, inverse=False, factors=factors), divide=False)

    def inverse_weight(self, W_t: Tensor, *,
                       factors: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Exact inverse of :meth:`forward_weight`: (..., n1 n2) -> (..., n)."""
        self._check_in(W_t, self.padded_in_features, "W_t")
        X = self._rotate(self._scale_chunks(W_t, divide=True), inverse=True, factors=factors)
        return (X / _pad_ones(self.s1, self.padded_in_features))[..., : self.in_features]

    def forward_input(self, x: Tensor) -> Tensor:
        """``x_t = T^{-1} x``, so ``forward_weight(W) @ x_t == W @ x``: (..., n) -> (..., n_pad).

        Since P1 (x) P2 is orthogonal: pad, / s1, P1^T X P2, / s2.
        """
        self._check_in(x, self.in_features, "x")
        n_pad = self.padded_in_features
        X = F.pad(x, (0, n_pad - self.in_features)) / _pad_ones(self.s1, n_pad)
        return self._scale_chunks(self._rotate(X, inverse=False), divide=True)

    def forward(self, W: Tensor) -> Tensor:
        return self.forward_weight(W)

    def apply(  # type: ignore[override]
        self, W: Tensor | Callable[[nn.Module], None]
    ) -> Tensor | nn.Module:
        """``forward_weight(W)`` for a tensor; ``nn.Module.apply(fn)`` for a callable."""
        if callable(W) and not isinstance(W, Tensor):
            return super().apply(W)
        return self.forward_weight(W)

    inverse = inverse_weight

    def materialize(self) -> Tensor:
        """Dense T (n_pad, n_pad) with ``forward_weight(W) == pad(W) @ T`` (small sizes only)."""
        n_pad = self.padded_in_features
        s1 = _pad_ones(self.s1, n_pad)
        s2 = self._s2_full().expand(self.n1, self.n2 // self._d, self._d).reshape(n_pad)
        return s1[:, None] * torch.kron(self.P1(), self.P2()) * s2[None, :]

    def fused_factors(self, M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(L, R, s2_act)`` of ``T* = M_blk^T T^{-1}`` (Eq. 4) for :func:`apply_fused`.

        ``M`` (d, D). ``L = P1^T`` (n1, n1), ``R = P2 blockdiag(M x n2/d)`` (n2, (n2/d) D),
        ``s2_act = 1 / s2`` (n1, n2/d, 1). ``s1`` is used as is (``self.s1``).
        """
        if M.shape[0] != self._d:
            raise ValueError(f"M must have {self._d} rows (d), got shape {tuple(M.shape)}")
        M_blk = torch.block_diag(*([M.to(self.P2_init)] * (self.n2 // self._d)))  # (n2, n2/d D)
        return self.P1().T, self.P2() @ M_blk, 1.0 / self._s2_full()

    def extra_repr(self) -> str:
        pad = self.padded_in_features - self.in_features
        return (
            f"in_features={self.in_features}, d={self._d}, block_shape=({self.n1}, "
            f"{self.n2}), padding={pad}, init={self.init_kind!r}"
        )
