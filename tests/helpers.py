"""Small assertion helpers shared by the tests (importable: pytest puts tests/ on sys.path)."""

import torch


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float = 1e-10, rtol: float = 0
) -> None:
    """Max-abs-error check (cheaper to import than torch.testing, whose first call costs ~1 s)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= atol + rtol * expected.abs().max().item(), f"max abs error {err:.3g}"
