"""Hadamard constructions and orthogonal initialisations (liftquant.core.hadamard)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from liftquant.core.hadamard import hadamard, has_hadamard, orthogonal_init

SHIPPED_ORDERS = [1, 2, 4, 12, 20, 24, 28, 36, 40, 44, 48, 60, 64, 76, 96, 108, 128, 140, 148, 576]
UNSUPPORTED_ORDERS = [3, 6, 7, 18, 52, 92, 100, 172]


@pytest.mark.parametrize("n", SHIPPED_ORDERS)
def test_hadamard_is_hadamard(n: int) -> None:
    H = hadamard(n, dtype=torch.float64)
    assert H.shape == (n, n)
    assert set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))
    assert has_hadamard(n)


def test_hadamard_returns_fresh_tensor() -> None:
    H = hadamard(12)
    H.zero_()
    assert torch.equal(hadamard(12).abs(), torch.ones(12, 12))


@pytest.mark.parametrize("n", UNSUPPORTED_ORDERS)
def test_unsupported_order_raises(n: int) -> None:
    assert not has_hadamard(n)
    with pytest.raises(ValueError, match="orthogonal_init"):
        hadamard(n)


@pytest.mark.parametrize("n", [7, 18, 52, 12, 64])
@pytest.mark.parametrize("kind", ["hadamard", "dct", "random", "identity"])
def test_orthogonal_init_is_orthonormal(n: int, kind: str) -> None:
    P = orthogonal_init(n, kind=kind, seed=3, dtype=torch.float64)
    assert P.shape == (n, n)
    assert_close(P @ P.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)


def test_orthogonal_init_hadamard_and_fallback() -> None:
    P = orthogonal_init(12, dtype=torch.float64)
    assert_close(P, hadamard(12, dtype=torch.float64) / 12**0.5)
    P7 = orthogonal_init(7, dtype=torch.float64)  # DCT fallback: dense, first row flat
    assert (P7.abs() > 0).sum() > 7 * 7 // 2
    assert_close(P7[0], torch.full((7,), 7**-0.5, dtype=torch.float64))


def test_orthogonal_init_random_is_seeded() -> None:
    a = orthogonal_init(9, kind="random", seed=1)
    assert torch.equal(a, orthogonal_init(9, kind="random", seed=1))
    assert not torch.allclose(a, orthogonal_init(9, kind="random", seed=2))


def test_orthogonal_init_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown"):
        orthogonal_init(8, kind="householder")
