"""The math of the RTN and GPTQ baselines (SPEC §8) as pure functions over tensors: the run's
:class:`BaselineSpec`, the uniform min-max grid (:func:`minmax_params`, :func:`quantize_codes`),
round-to-nearest (:func:`rtn_quantize`), GPTQ of one linear given its input Hessian
(:func:`gptq_quantize`) and their result :class:`QuantizedWeight` with its bit-plane packing.
It owns no model loop (that is :mod:`liftquant.quantize.baselines`) and no checkpoint format (that
is :mod:`liftquant.io.baseline_format`); it may import :mod:`liftquant.util` and the rest of
:mod:`liftquant.core` only (the bit layout of :mod:`liftquant.core.pack`), never the pipeline, the
checkpoint code or the apps (``tests/test_baseline_layout.py``).

Both baselines quantize onto a uniform asymmetric min-max grid per output row and input group:

    code  q = clamp(round(w / s) + z, 0, 2^b - 1),     w_hat = s * (q - z)

with ``s`` stored as float16 and ``z`` an integer. ``group_size = 0`` means one group per row
(per-channel). The range always contains 0 (GPTQ's ``Quantizer.find_params``), so padding a
group with zeros never changes its parameters.

* **RTN** rounds each weight independently; it needs no calibration data.
* **GPTQ** (Frantar et al. 2022, own implementation): per linear, given the Hessian ``H`` of its
  calibration inputs (collected by :mod:`liftquant.quantize.baselines`); damping
  ``H += damp * mean(diag H) * I``; dead input channels (zero diagonal) are zeroed; optional
  act-order (columns in order of decreasing ``diag H``, dead ones last); columns are quantized
  one by one and the rounding error is spread over the not yet quantized columns through the
  upper Cholesky factor ``U`` of ``H^-1`` (lazy batch updates of ``BLOCK_SIZE`` columns; a
  group's scale and zero come from its columns as updated so far, pending lazy updates
  included). ``tests/test_gptq_reference.py`` checks it against a textbook version.

``QuantizedWeight.state`` packs codes and zeros as uint8 bit planes ``(bits, rows, ceil(k/8))``
(bit plane ``i`` holds bit ``i`` of every code, LSB first along the last dimension with
:func:`liftquant.core.pack.pack_signs`); the checkpoint that stores them is described in
:mod:`liftquant.io.baseline_format`. Bits are counted exactly as stored: ``b`` per weight + per
group 16 (scale) + ``b`` (zero) + 32 per input column for ``g_idx``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from liftquant.core.pack import pack_signs, unpack_signs
from liftquant.util.log import get_logger

logger = get_logger("baselines")

METHODS = ("rtn", "gptq")
BITS_RANGE = (2, 8)
SCALE_MIN = 1e-6  # float16 keeps it (subnormal); all-zero groups get this scale and code = zero
BLOCK_SIZE = 128  # GPTQ lazy-batch width (IST-DASLab/gptq default)
# Hessian weight of each calibration window's first token (the attention sink; see
# liftquant.quantize.baselines). 1 = textbook GPTQ. Chosen on SmolLM2 (bench/quality/README.md,
# "GPTQ vs RTN"): 64 brings the sink's q/k/v error well below RTN's while the other tokens' stays
# close to textbook GPTQ's, and takes w4g128 perplexity from above RTN's to below it.
FIRST_TOKEN_WEIGHT = 64.0
DAMP_RETRIES = 5  # Cholesky failures: damping x10 per retry before giving up
SCALE_BITS, GIDX_BITS = 16, 32


@dataclass(frozen=True)
class BaselineSpec:
    """What a baseline run does; ``name`` labels it in reports (e.g. ``gptq-w3g128``)."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    sym: bool = False
    first_token_weight: float = FIRST_TOKEN_WEIGHT

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"baseline method must be one of {METHODS}, got {self.method!r}")
        if not BITS_RANGE[0] <= self.bits <= BITS_RANGE[1]:
            raise ValueError(f"baseline bits must be in {BITS_RANGE}, got {self.bits}")
        if self.group_size < 0 or self.damp <= 0:
            raise ValueError("group_size must be >= 0 (0: per-channel) and damp > 0")
        if self.first_token_weight <= 0:
            raise ValueError("first_token_weight must be > 0 (1: textbook GPTQ)")

    @property
    def name(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "pc"
        extra = "-act" if self.act_order and self.method == "gptq" else ""
        if self.method == "gptq" and self.first_token_weight != FIRST_TOKEN_WEIGHT:
            extra += f"-ftw{self.first_token_weight:g}"
        return f"{self.method}-w{self.bits}{group}{extra}{'-sym' if self.sym else ''}"


# ------------------------------------------------------------------------ quantized tensor
def _pack_planes(codes: Tensor, bits: int) -> Tensor:
    """Integer codes (rows, k) < 2^bits -> uint8 bit planes (bits, rows, ceil(k/8))."""
    planes = torch.stack([(codes >> i) & 1 for i in range(bits)]).bool()  # (bits, rows, k)
    return pack_signs(planes)


def _unpack_planes(packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`_pack_planes`: uint8 (bits, rows, ceil(k/8)) -> uint8 codes (rows, k)."""
    planes = unpack_signs(packed, k, dtype=torch.int16) > 0  # (bits, rows, k)
    codes = torch.zeros(planes.shape[1:], dtype=torch.int16, device=packed.device)
    for i in range(planes.shape[0]):
        codes |= planes[i].to(torch.int16) << i
    return codes.to(torch.uint8)


@dataclass
class QuantizedWeight:
    """Integer codes (out, in), float16 scales and integer zeros (out, G), optional g_idx."""

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor | None
    bits: int
    group_size: int

    def group_index(self) -> Tensor:
        """Group of every input column, (in,) long."""
        if self.g_idx is not None:
            return self.g_idx.long()
        in_features = self.codes.shape[1]
        return torch.arange(in_features, device=self.codes.device) // (self.group_size or in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense weight ``s * (q - z)`` (out, in), computed in float32 then cast to ``dtype``."""
        g = self.group_index()
        s, z = self.scales.float()[:, g], self.zeros.float()[:, g]  # (out, in)
        return ((self.codes.float() - z) * s).to(dtype)

    def storage_bits(self, *, bias_bits: int = 0) -> dict[str, int]:
        """Bits stored at inference: codes, and scales + zeros + g_idx + bias as side bits."""
        out_f, in_f = self.codes.shape
        side = self.scales.numel() * (SCALE_BITS + self.bits) + bias_bits
        if self.g_idx is not None:
            side += in_f * GIDX_BITS
        return {"code_bits": out_f * in_f * self.bits, "side_bits": side,
                "weights": out_f * in_f}

    def cpu(self) -> QuantizedWeight:
        g_idx = None if self.g_idx is None else self.g_idx.cpu()
        return QuantizedWeight(self.codes.cpu(), self.scales.cpu(), self.zeros.cpu(), g_idx,
                               self.bits, self.group_size)

    def state(self, prefix: str) -> dict[str, Tensor]:
        cpu = self.cpu()
        state = {f"{prefix}.qweight": _pack_planes(cpu.codes, self.bits),
                 f"{prefix}.scales": cpu.scales.half().contiguous(),
                 f"{prefix}.qzeros": _pack_planes(cpu.zeros, self.bits)}
        if cpu.g_idx is not None:
            state[f"{prefix}.g_idx"] = cpu.g_idx.to(torch.int32).contiguous()
        return state

    @classmethod
    def from_state(cls, state: dict[str, Tensor], prefix: str, *, in_features: int, bits: int,
                   group_size: int) -> QuantizedWeight:
        """Pop this layer's packed tensors from ``state`` and rebuild it."""
        scales = state.pop(f"{prefix}.scales")
        codes = _unpack_planes(state.pop(f"{prefix}.qweight"), in_features)
        zeros = _unpack_planes(state.pop(f"{prefix}.qzeros"), scales.shape[1])
        return cls(codes=codes, scales=scales, zeros=zeros, g_idx=state.pop(f"{prefix}.g_idx", None),
                   bits=bits, group_size=group_size)


# ------------------------------------------------------------------------------ the math
def minmax_params(x: Tensor, *, bits: int, sym: bool = False) -> tuple[Tensor, Tensor]:
    """Scale (float16-representable) and integer zero per row of ``x`` (rows, k), as float32."""
    maxq = 2**bits - 1
    xmin = x.min(dim=1).values.clamp(max=0.0)
    xmax = x.max(dim=1).values.clamp(min=0.0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    scale = ((xmax - xmin) / maxq).clamp_min(SCALE_MIN).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, *, bits: int) -> Tensor:
    """Codes ``clamp(round(w / s) + z, 0, 2^b - 1)`` (float tensor of integers)."""
    return (torch.round(w / scale) + zero).clamp(0, 2**bits - 1)


def rtn_quantize(weight: Tensor, *, bits: int, group_size: int = 0,
                 sym: bool = False) -> QuantizedWeight:
    """Round-to-nearest of ``weight`` (out, in) on a min-max grid per row and group."""
    w = weight.detach().float()
    out_f, in_f = w.shape
    gs = group_size or in_f
    n_groups = math.ceil(in_f / gs)
    padded = torch.nn.functional.pad(w, (0, n_groups * gs - in_f))  # zeros keep min/max
    scale, zero = minmax_params(padded.reshape(out_f * n_groups, gs), bits=bits, sym=sym)
    scale, zero = scale.view(out_f, n_groups), zero.view(out_f, n_groups)  # (out, G)
    g = torch.arange(in_f, device=w.device) // gs
    codes = quantize_codes(w, scale[:, g], zero[:, g], bits=bits)
    return QuantizedWeight(codes=codes.to(torch.uint8), scales=scale.half(),
                           zeros=zero.to(torch.uint8), g_idx=None, bits=bits,
                           group_size=group_size)


def _inverse_cholesky_upper(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, so that U^T U = H^-1."""
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    lam = damp * H.diagonal().mean()
    for attempt in range(DAMP_RETRIES):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        logger.warning("Hessian not positive definite (damping %.2e); retrying x10", float(lam))
        lam = lam * 10
    raise FloatingPointError("GPTQ: Hessian stays singular after damping; check the inputs")


def gptq_quantize(weight: Tensor, hessian: Tensor, *, bits: int, group_size: int = 0,
                  damp: float = 0.01, act_order: bool = False, sym: bool = False,
                  block_size: int = BLOCK_SIZE) -> QuantizedWeight:
    """GPTQ of ``weight`` (out, in) given the input Hessian (in, in); see the module docstring."""
    W = weight.detach().float().clone()  # (out, in), updated in place with the spread error
    H = hessian.detach().float().clone()  # (in, in)
    out_f, in_f = W.shape
    # act-order sorts on the diagonal before dead inputs get their placeholder 1, so they go
    # last whatever the Hessian's normalisation (X^T X / n or 2 X^T X): the order, and with it
    # the groups, must not depend on a scale that GPTQ itself is invariant to
    perm = (torch.argsort(H.diagonal(), descending=True, stable=True) if act_order
            else torch.arange(in_f, device=W.device))
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    W, H = W[:, perm], H[perm][:, perm]  # columns in quantization order
    U = _inverse_cholesky_upper(H, damp)
    gs = group_size or in_f
    n_groups = math.ceil(in_f / gs)
    codes = torch.zeros_like(W)
    scales = torch.zeros(out_f, n_groups, device=W.device)
    zeros = torch.zeros_like(scales)
    scale = zero = None
    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        W1, E = W[:, b0:b1].clone(), torch.zeros(out_f, b1 - b0, device=W.device)
        for j in range(b1 - b0):
            c = b0 + j
            if c % gs == 0:  # group start: its columns as updated so far (this block, then later)
                spill = slice(b1, min(c + gs, in_f))  # group columns past this lazy batch:
                later = W[:, spill] - E[:, :j] @ U[b0:c, spill]  # + this batch's pending update
                cols = torch.cat([W1[:, j:j + gs], later], dim=1)
                scale, zero = minmax_params(cols, bits=bits, sym=sym)
                scales[:, c // gs], zeros[:, c // gs] = scale, zero
            q = quantize_codes(W1[:, j], scale, zero, bits=bits)
            codes[:, c] = q
            err = (W1[:, j] - scale * (q - zero)) / U[c, c]
            W1[:, j:] -= err[:, None] * U[c, c:b1][None, :]
            E[:, j] = err
        W[:, b1:] -= E @ U[b0:b1, b1:]
    inv = torch.argsort(perm)
    g_idx = (inv // gs).to(torch.int32) if act_order and group_size else None
    return QuantizedWeight(codes=codes[:, inv].to(torch.uint8), scales=scales.half(),
                           zeros=zeros.to(torch.uint8), g_idx=g_idx, bits=bits,
                           group_size=group_size)


def quantize_weight(weight: Tensor, spec: BaselineSpec, hessian: Tensor | None = None
                    ) -> QuantizedWeight:
    if spec.method == "rtn":
        return rtn_quantize(weight, bits=spec.bits, group_size=spec.group_size, sym=spec.sym)
    if hessian is None:
        raise ValueError("GPTQ needs the input Hessian of the layer")
    return gptq_quantize(weight, hessian, bits=spec.bits, group_size=spec.group_size,
                         damp=spec.damp, act_order=spec.act_order, sym=spec.sym)

