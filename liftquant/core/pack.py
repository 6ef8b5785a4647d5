"""The one bit layout for sign codes: ``signs_lsb_first_v1``.

A sign matrix Y in {-1, +1}^(rows x K) is stored as uint8 (rows x ceil(K / 8)). Along the last
(input / lifted) dimension, element ``k`` lives in byte ``k // 8`` at bit ``k % 8`` (LSB
first); bit value 1 means +1, 0 means -1. Padding bits of the last byte are 0 and ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

PACK_LAYOUT = "signs_lsb_first_v1"
_BIT_WEIGHTS = [1 << i for i in range(8)]


def packed_width(k: int) -> int:
    """Bytes per row for ``k`` signs."""
    return (k + 7) // 8


def pack_signs(signs: Tensor) -> Tensor:
    """Pack signs (..., K) given as +-1 numbers or booleans (True = +1) into uint8 (..., ceil(K/8))."""
    bits = signs if signs.dtype == torch.bool else signs > 0
    k = bits.shape[-1]
    pad = packed_width(k) * 8 - k
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*bits.shape[:-1], -1, 8).to(torch.uint8)  # (..., K/8, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (bits * weights).sum(-1, dtype=torch.uint8)  # sum of distinct powers: no overflow


def unpack_signs(packed: Tensor, k: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`pack_signs`: uint8 (..., ceil(K/8)) -> +-1 values (..., K) in ``dtype``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed signs must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_width(k):
        raise ValueError(f"packed width {packed.shape[-1]} does not hold {k} signs")
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # (..., K/8, 8)
    bits = bits.reshape(*packed.shape[:-1], -1)[..., :k]
    return bits.to(dtype) * 2 - 1
