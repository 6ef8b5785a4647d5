"""Uniform straight-through proxy quantizer used while learning the whitening T (paper Eq. 3).

Stage 1 needs a cheap, differentiable stand-in for the lattice: each whitened row is quantized
to ``2^bits`` symmetric mid-rise levels ``{+-0.5, +-1.5, ...} * step`` with
``step = clip * max|w_row| / (2^(bits-1) - 0.5)`` and a learnable per-row clip ratio; rounding
passes gradients straight through (STE). ``bits`` defaults to ``floor(D / d)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Learnable clip ratio is kept inside this range (fraction of the row's max |w|).
CLIP_RANGE = (0.3, 1.0)
CLIP_INIT = 0.9


def ste_round(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def uniform_proxy(w: Tensor, clip: Tensor, bits: int) -> Tensor:
    """Quantize-dequantize the rows of ``w`` (..., rows, n) with clip ratios ``clip`` (..., rows)
    (raw, clamped here to ``CLIP_RANGE``); leading dims are a batch of layers."""
    half_levels = 2 ** (bits - 1)
    clip = clip.clamp(*CLIP_RANGE)[..., None]
    step = (clip * w.abs().amax(dim=-1, keepdim=True)).clamp_min(1e-8) / (half_levels - 0.5)
    q = ste_round(w / step - 0.5) + 0.5  # mid-rise: levels at +-0.5, +-1.5, ...
    q = q.clamp(-half_levels + 0.5, half_levels - 0.5)
    return q * step


class UniformProxy(nn.Module):
    """Per-row symmetric uniform quantizer with STE rounding and a learnable clip ratio."""

    def __init__(self, rows: int, *, bits: int, clip_init: float = CLIP_INIT) -> None:
        super().__init__()
        if bits < 1:
            raise ValueError(f"proxy bits must be >= 1, got {bits}")
        self.bits = bits
        self.clip = nn.Parameter(torch.full((rows,), float(clip_init)))

    def forward(self, w: Tensor) -> Tensor:
        """Quantize-dequantize rows of ``w`` (rows, n)."""
        return uniform_proxy(w, self.clip, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, rows={self.clip.numel()}"
