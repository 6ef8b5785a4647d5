"""Kronecker whitening T (Eq. 2), its fused form T* (Eq. 4) and the block_shape rule."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from liftquant.core.hadamard import has_hadamard
from liftquant.core.whiten import (
    KronWhitening,
    apply_fused,
    block_shape,
    padded_in_features,
)

MODEL_SIZES = [576, 896, 1536, 2048, 4096, 4864, 5120, 8192, 11008, 14336, 13824, 28672]
ODD_SIZES = [63, 100]
TARGET_DIMS = [7, 8, 10, 14, 16]
F64 = torch.float64


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=F64)


def _adam_steps(
    params: list[torch.nn.Parameter], loss_fn: Callable[[], torch.Tensor], *, steps: int, lr: float
) -> None:
    """Plain Adam (beta 0.9/0.999, eps 1e-8), written out: importing torch.optim pulls in
    torch._dynamo (~2.5 s), more than this whole file needs otherwise."""
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        grads = torch.autograd.grad(loss_fn(), params)
        with torch.no_grad():
            for p, g, m_i, v_i in zip(params, grads, m, v, strict=True):
                m_i.mul_(0.9).add_(g, alpha=0.1)
                v_i.mul_(0.999).addcmul_(g, g, value=0.001)
                m_hat, v_hat = m_i / (1 - 0.9**t), v_i / (1 - 0.999**t)
                p.sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))


def _randomised(in_features: int, d: int, *, seed: int = 0, steps: int = 3) -> KronWhitening:
    """A whitening with random s1/s2 and P moved away from init by a few Adam steps."""
    gen = torch.Generator().manual_seed(seed)
    T = KronWhitening(in_features, d, dtype=F64)
    with torch.no_grad():
        T.set_s1(torch.rand(in_features, generator=gen, dtype=F64) + 0.5)
        T.s2.copy_(torch.rand(T.s2.shape, generator=gen, dtype=F64) + 0.5)
    W = torch.randn(5, in_features, generator=gen, dtype=F64)
    # non-trivial loss: the 4th moment prefers spiky rows, so P has to move
    _adam_steps(
        [T.P1_skew, T.P2_skew], lambda: (T.forward_weight(W) ** 4).mean(), steps=steps, lr=0.05
    )
    assert T.P1_skew.detach().abs().max() > 0 and T.P2_skew.detach().abs().max() > 0
    return T


# ------------------------------------------------------------------------------ block_shape
def test_block_shape_grid_is_valid_and_fast() -> None:
    block_shape.cache_clear()
    start = time.perf_counter()
    for n in MODEL_SIZES + ODD_SIZES:
        for d in TARGET_DIMS:
            n1, n2 = block_shape(n, d, "v1")
            assert n2 % d == 0 and n1 * n2 >= n, (n, d, n1, n2)
            assert n1 * n2 - n < d, (n, d, n1, n2)  # minimal padding
            if n % d == 0:
                assert n1 * n2 == n, (n, d, n1, n2)
            assert padded_in_features(n, d, "v1") == n1 * n2
            m1, m2 = block_shape(n, d)  # v2: v1 unless unbalanced, then a little more padding
            assert m2 % d == 0 and m1 * m2 >= n and padded_in_features(n, d) == m1 * m2
            assert m1 * m2 - n <= max(d, int(0.01 * n)) + d, (n, d, m1, m2)
            if n1 + n2 <= 1.5 * 2 * (n1 * n2) ** 0.5:
                assert (m1, m2) == (n1, n2), (n, d)
            else:
                assert m1 + m2 <= n1 + n2, (n, d)  # never less balanced (may be the same)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(("n", "d", "v1", "v2"), [
    (4864, 10, (487, 10), (70, 70)),      # Qwen2.5-0.5B down_proj at 24to10
    (3584, 10, (359, 10), (60, 60)),      # Qwen2.5-7B hidden at 24to10
    (11008, 14, (787, 14), (132, 84)),    # Llama-2-7B down_proj at 30to14
    (4096, 8, (64, 64), (64, 64)),        # balanced shapes are the same under both rules
    (4096, 10, (82, 50), (82, 50)),
])
def test_block_shape_v2_fixes_unbalanced_factorisations(n, d, v1, v2) -> None:
    assert block_shape(n, d, "v1") == v1 and block_shape(n, d) == v2
    with pytest.raises(ValueError, match="unknown block-shape rule"):
        block_shape(n, d, "v9")


@pytest.mark.parametrize(
    ("n", "d", "expected"),
    [
        (576, 8, (24, 24)),
        (1536, 8, (48, 32)),
        (4096, 8, (64, 64)),
        (11008, 8, (86, 128)),
        (4096, 10, (82, 50)),
        (14336, 14, (128, 112)),
        (896, 10, (30, 30)),
        (13824, 8, (108, 128)),
    ],
)
def test_block_shape_documented_examples(n: int, d: int, expected: tuple[int, int]) -> None:
    assert block_shape(n, d) == expected == block_shape(n, d, "v1")


def test_block_shape_prefers_hadamard_pairs() -> None:
    for n in [576, 1536, 2048, 4096, 4864, 5120, 8192, 13824, 14336, 28672]:
        n1, n2 = block_shape(n, 8)
        assert has_hadamard(n1) and has_hadamard(n2), (n, n1, n2)


def test_block_shape_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        block_shape(0, 8)
    with pytest.raises(ValueError):
        block_shape(64, 0)


# ------------------------------------------------------------------------- KronWhitening
@pytest.mark.parametrize(("n", "d"), [(64, 8), (50, 7), (37, 4)])
def test_inverse_round_trip(n: int, d: int) -> None:
    T = _randomised(n, d)
    W = torch.randn(6, n, dtype=F64)
    W_t = T.apply(W)
    assert W_t.shape == (6, T.padded_in_features)
    assert_close(T.inverse(W_t), W, atol=1e-10, rtol=0)
    assert_close(T.inverse_weight(T.forward_weight(W)), W, atol=1e-10, rtol=0)


def test_orthogonality_after_adam_step() -> None:
    T = _randomised(60, 6, steps=5)
    P1, P2 = T.P1(), T.P2()
    assert not torch.allclose(P1, T.P1_init)
    assert_close(P1 @ P1.T, _eye(T.n1), atol=1e-12, rtol=0)
    assert_close(P2 @ P2.T, _eye(T.n2), atol=1e-12, rtol=0)


def test_orthogonality_float32() -> None:
    T = KronWhitening(64, 8)
    W = torch.randn(4, 64)
    _adam_steps(list(T.parameters()), lambda: T.forward_weight(W).abs().sum(), steps=2, lr=0.1)
    P1 = T.P1().detach()
    assert_close(P1 @ P1.T, torch.eye(T.n1), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("n", "d"), [(64, 8), (50, 7)])
def test_materialize_matches_live_form(n: int, d: int) -> None:
    T = _randomised(n, d)
    W = torch.randn(3, n, dtype=F64)
    dense = T.materialize()
    assert dense.shape == (T.padded_in_features, T.padded_in_features)
    W_pad = F.pad(W, (0, T.padded_in_features - n))
    assert_close(W_pad @ dense, T.forward_weight(W), atol=1e-10, rtol=0)


@pytest.mark.parametrize(("n", "d"), [(64, 8), (50, 7), (37, 4)])
def test_forward_input_preserves_outputs(n: int, d: int) -> None:
    T = _randomised(n, d)
    W = torch.randn(5, n, dtype=F64)
    x = torch.randn(2, 3, n, dtype=F64)  # leading batch dims
    out = x @ W.T
    out_t = T.forward_input(x) @ T.forward_weight(W).T
    assert_close(out_t, out, atol=1e-10, rtol=0)


def test_identity_init_and_shape_errors() -> None:
    T = KronWhitening(24, 4, init="identity", dtype=F64)
    W = torch.randn(2, 24, dtype=F64)
    assert_close(T.forward_weight(W), W)
    with pytest.raises(ValueError):
        T.forward_weight(torch.randn(2, 23, dtype=F64))
    with pytest.raises(ValueError):
        T.set_s1(torch.zeros(24, dtype=F64))


def test_gradients_reach_all_parameters() -> None:
    T = KronWhitening(40, 8, dtype=F64)
    with torch.no_grad():
        T.set_s1(torch.rand(40, dtype=F64) + 0.5)
    W = torch.randn(4, 40, dtype=F64)
    x = torch.randn(8, 40, dtype=F64)
    loss = (T.forward_weight(W) ** 3).sum() + (T.forward_input(x) ** 3).sum()
    loss.backward()
    for name in ("s1", "s2", "P1_skew", "P2_skew"):
        grad = getattr(T, name).grad
        assert grad is not None and grad.abs().max() > 0, name


def test_learn_flags_freeze_parameters() -> None:
    T = KronWhitening(32, 8, learn_P=False, learn_s1=False, learn_s2=True)
    trainable = {name for name, p in T.named_parameters() if p.requires_grad}
    assert trainable == {"s2"}


def test_module_apply_still_recurses() -> None:
    T = KronWhitening(16, 4)
    seen: list[str] = []
    T.apply(lambda m: seen.append(type(m).__name__))
    assert seen == ["KronWhitening"]


def test_properties() -> None:
    T = KronWhitening(4096, 10)
    assert T.d == 10
    assert T.block_shape == block_shape(4096, 10)
    assert T.padded_in_features == padded_in_features(4096, 10) == 4100
    assert T.s2.shape == (T.n1, T.n2 // 10)


# ------------------------------------------------------------------------- fused form (Eq. 4)
@pytest.mark.parametrize(("n", "d", "D"), [(37, 4, 8), (40, 3, 7), (64, 8, 16)])
def test_apply_fused_matches_forward_input_times_M(n: int, d: int, D: int) -> None:
    T = _randomised(n, d, seed=n)
    if n % d:
        assert T.padded_in_features > n
    M = torch.randn(d, D, dtype=F64)
    x = torch.randn(2, 5, n, dtype=F64)
    L, R, s2_act = T.fused_factors(M)
    assert L.shape == (T.n1, T.n1) and R.shape == (T.n2, T.n2 // d * D)
    assert s2_act.shape == (T.n1, T.n2 // d, 1)
    got = apply_fused(x, s1=T.s1, L=L, R=R, s2_act=s2_act, d=d, D=D)
    chunks = T.forward_input(x).reshape(2, 5, -1, d)  # (2, 5, n_pad / d, d)
    expected = (chunks @ M).reshape(2, 5, -1)  # each chunk c -> M^T c
    assert got.shape == (2, 5, T.padded_in_features // d * D)
    assert_close(got, expected, atol=1e-10, rtol=0)


def test_apply_fused_shape_check() -> None:
    T = KronWhitening(24, 4, dtype=F64)
    L, R, s2_act = T.fused_factors(torch.randn(4, 8, dtype=F64))
    with pytest.raises(ValueError):
        apply_fused(torch.randn(3, 24, dtype=F64), s1=T.s1, L=L, R=R, s2_act=s2_act, d=4, D=6)
