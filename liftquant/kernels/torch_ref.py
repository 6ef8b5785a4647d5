"""The torch reference backend: the numerical oracle for every other backend (STYLE 2.1.7).

``linear`` is the decode of paper Eq. 4 written with plain torch ops: ``T*(x)`` as two small
dense matmuls (``whiten.apply_fused``), signs unpacked to +-1 (``pack.unpack_signs``), one
dense matmul, per-row scale and bias. It runs on any device and dtype and is what
``PackedLiftLinear.forward`` computed before kernel backends existed.

The pair-layout helpers mirror the Triton GEMV's activation layout (``triton_int1``) so tests
can check the fused transform kernel element by element.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Weights per packed 32-bit word in the GEMV pair layout.
WORD_BITS = 32


def linear(layer, x: Tensor) -> Tensor:
    """``scale * (unpack(packed_signs) @ T*(x)) + bias`` in ``x.dtype`` (reference)."""
    out = (layer.fused_input(x) @ layer.signs(x.dtype).T) * layer.scale.to(x.dtype)
    if layer.bias is not None:
        out = out + layer.bias.to(x.dtype)
    return out


@torch.no_grad()
def dense_linear(layer, x: Tensor) -> Tensor:
    """The same layer through its dense dequantized weight, in float64 (test oracle)."""
    W = layer.dequantize_weight().double()  # (out, in)
    out = x.double() @ W.T
    if layer.bias is not None:
        out = out + layer.bias.double()
    return out


def pair_factors(device=None) -> Tensor:
    """(16,) ``f_p``: pair-layout value ``y_p = f_p x`` (``2^e_p``, and -1 for the sign bit)."""
    from liftquant.kernels.triton_int1 import pair_exponent

    f = [2.0 ** pair_exponent(p) for p in range(15)] + [-1.0]
    return torch.tensor(f, dtype=torch.float32, device=device)


def pair_layout(xs: Tensor, word_scale: Tensor) -> Tensor:
    """The GEMV's activation operand: (B, K) -> fp16 (B, 16, 2 KW), viewable as int32 (B, 16, KW).

    ``[b, p, 2q + half] = f_p * xs[b, 32q + 16 half + p] / word_scale[b, q]`` (zero padded to
    ``KW = ceil(K / 32)`` words; see ``triton_int1`` for ``f_p``).
    """
    B, K = xs.shape
    KW = -(-K // WORD_BITS)
    padded = torch.nn.functional.pad(xs.float(), (0, KW * WORD_BITS - K))  # (B, KW * 32)
    words = padded.reshape(B, KW, 2, 16) / word_scale[:, :, None, None]  # [b, q, half, p]
    words = words * pair_factors(xs.device)
    return words.permute(0, 3, 1, 2).contiguous().reshape(B, 16, 2 * KW).half()


def unpair(xp: Tensor, word_scale: Tensor, K: int) -> Tensor:
    """Inverse of :func:`pair_layout` for a kernel's (XP int32, word scales): (B, K) fp32."""
    B, _, KW = xp.shape
    halves = xp.contiguous().view(torch.float16).reshape(B, 16, KW, 2).float()
    words = halves.permute(0, 2, 3, 1) / pair_factors(xp.device)  # [b, q, half, p]
    words = words.reshape(B, KW, WORD_BITS) * word_scale[:, :, None]
    return words.reshape(B, KW * WORD_BITS)[:, :K]


class TorchBackend:
    """Always available; unpack -> matmul."""

    name = "torch"

    @staticmethod
    def unavailable_reason(device: torch.device) -> str | None:
        return None

    def linear(self, layer, x: Tensor) -> Tensor:
        return linear(layer, x)
