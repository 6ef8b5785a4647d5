"""Round-to-nearest and GPTQ baselines, run by the toolkit on the same model and data (SPEC §8).

Both quantize every linear of the adapter's groups (the LM head and embeddings stay in full
precision, exactly as for LiftQuant) onto a uniform asymmetric min-max grid per output row and
input group:

    code  q = clamp(round(w / s) + z, 0, 2^b - 1),     w_hat = s * (q - z)

with ``s`` stored as float16 and ``z`` an integer. ``group_size = 0`` means one group per row
(per-channel). The range always contains 0 (GPTQ's ``Quantizer.find_params``), so padding a
group with zeros never changes its parameters.

* **RTN** rounds each weight independently; it needs no calibration data.
* **GPTQ** (Frantar et al. 2022, own implementation): per linear, the Hessian
  ``H = sum_t c_t x_t x_t^T / n`` of its calibration inputs, where every token counts once
  (``c_t = 1``) except the first token of each calibration window, which counts
  ``first_token_weight`` times (see below); damping ``H += damp * mean(diag H) * I``; dead input
  channels (zero diagonal) are zeroed; optional act-order (columns in order of decreasing
  ``diag H``, dead ones last); columns are quantized one by one and the rounding error is spread
  over the not yet quantized columns through the upper Cholesky factor ``U`` of ``H^-1`` (lazy
  batch updates of ``BLOCK_SIZE`` columns; a group's scale and zero come from its columns as
  updated so far, pending lazy updates included). Blocks are processed in order with
  true-sequential groups: the Hessian of a group is collected with the block's earlier groups
  already quantized, and the next block's inputs are the quantized block's outputs.
  ``tests/test_gptq_reference.py`` checks the per-layer algorithm against a textbook version.

**Why the first token is weighted** (bench/quality.md, "GPTQ vs RTN"): the first position of
every window becomes an attention sink (SmolLM2: residual activations of ~10^3 there). GPTQ moves
rounding error into input directions that carry little calibration energy; the sink's
(normalised) input is such a direction, as it is 1 token in L. With ``c_t = 1`` its q/k/v error
ends up 1.2-2x *larger* than round-to-nearest's in blocks 2-5 while every other token's halves,
and since every later query attends to the sink, the perplexity of textbook GPTQ at 4 bits fell
behind RTN's (19.26 vs 17.71 on SmolLM2). ``first_token_weight = 1`` is textbook GPTQ.

**Stored form** ("liftquant-baseline" checkpoints, safetensors only): per quantized linear
``<name>.qweight`` uint8 ``(bits, out, ceil(in/8))`` (bit plane ``i`` holds bit ``i`` of every
code, packed LSB first along the input dimension with :func:`liftquant.core.pack.pack_signs`),
``<name>.scales`` float16 ``(out, G)``, ``<name>.qzeros`` uint8 ``(bits, out, ceil(G/8))`` (same
bit-plane layout), ``<name>.g_idx`` int32 ``(in,)`` only with act-order and groups (the group of
each input column), and ``<name>.bias`` if any; every other tensor as in the FP model.
:func:`load_baseline` rebuilds dense weights, so the loaded model is a plain HF model whose
logits equal those of the model right after quantization. Bits are counted exactly as stored:
``b`` per weight + per group 16 (scale) + ``b`` (zero) + 32 per input column for ``g_idx``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from liftquant.core.pack import pack_signs, unpack_signs
from liftquant.models.adapters import ModelAdapter
from liftquant.quantize.cache import ActivationCache
from liftquant.quantize.capture import capture_block_inputs, kwargs_for_block
from liftquant.quantize.methods import (  # noqa: F401 - load_checkpoint: re-exported from its old home
    QuantMethod,
    load_checkpoint,
    register_method,
)
from liftquant.quantize.stream import BlockStream, forward_block, index_batches
from liftquant.util.log import get_logger, peak_memory_gib

logger = get_logger("baselines")

QUANT_METHOD = "liftquant-baseline"
FORMAT_VERSION = 1
PACK_LAYOUT = "bitplanes_lsb_first_v1"
METHODS = ("rtn", "gptq")
BITS_RANGE = (2, 8)
SCALE_MIN = 1e-6  # float16 keeps it (subnormal); all-zero groups get this scale and code = zero
BLOCK_SIZE = 128  # GPTQ lazy-batch width (IST-DASLab/gptq default)
# Hessian weight of each calibration window's first token (the attention sink; module
# docstring). 1 = textbook GPTQ. Chosen on SmolLM2 (bench/quality.md): 64 brings the sink's
# q/k/v error to 0.1-0.3x RTN's while the other tokens' stays within ~5 % of textbook GPTQ's;
# w4g128 perplexity (CPU, 6 windows) 17.83 -> 15.54, RTN 17.42.
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


# ------------------------------------------------------------------------------ model loop
class _StopBlock(Exception):
    """Raised by the Hessian hook: the rest of the block is not needed for this group."""


@torch.no_grad()
def _group_hessian(block: nn.Module, first: nn.Module, X: ActivationCache, block_kwargs: dict,
                   *, batch_size: int, device: torch.device,
                   first_token_weight: float = 1.0) -> Tensor:
    """``sum_t c_t x_t x_t^T / n`` over every calibration token of the input of ``first``
    (in, in), float32; ``c_t = first_token_weight`` at position 0 of each window, else 1."""
    H = torch.zeros(first.in_features, first.in_features, device=device)
    count = {"n": 0}

    def hook(_module, args):
        x = args[0].detach().float()  # (B, L, in)
        if first_token_weight != 1.0:
            x = x.clone()
            x[:, 0] *= math.sqrt(first_token_weight)
        x = x.reshape(-1, x.shape[-1])  # (B*L, in)
        H.addmm_(x.T, x)
        count["n"] += x.shape[0]
        raise _StopBlock

    handle = first.register_forward_pre_hook(hook)
    stream = BlockStream(block_kwargs, device=device, dtype=torch.float32)
    try:
        for idx, (x,) in stream.batches(index_batches(range(len(X)), batch_size), X):
            try:
                forward_block(block, x, stream.kwargs(len(idx)))
            except _StopBlock:
                continue
            raise RuntimeError("the block never called the linear being calibrated")
    finally:
        handle.remove()
        stream.close()
    return H / max(count["n"], 1)


@torch.no_grad()
def _propagate(block: nn.Module, X: ActivationCache, block_kwargs: dict, *, batch_size: int,
               device: torch.device) -> None:
    """Replace the block inputs in ``X`` by the (quantized) block's outputs, in place."""
    stream = BlockStream(block_kwargs, device=device, dtype=torch.float32)
    try:
        with stream.writer(X) as w:
            for idx, (x,) in stream.batches(index_batches(range(len(X)), batch_size), X):
                w.put(idx, forward_block(block, x, stream.kwargs(len(idx))))
    finally:
        stream.close()


def _set_weight(lin: nn.Module, qw: QuantizedWeight, dtype: torch.dtype) -> float:
    """Write the dequantized weight (rounded through the model dtype); return rel. weight error."""
    w_hat = qw.dequantize(dtype).to(lin.weight.device)
    rel = float((lin.weight.float() - w_hat.float()).square().sum()
                / lin.weight.float().square().sum().clamp_min(1e-30))
    lin.weight.data = w_hat.to(lin.weight.dtype)
    return rel


@torch.no_grad()
def quantize_baseline(model: nn.Module, calib_ids: Tensor | None, *, spec: BaselineSpec,
                      adapter: ModelAdapter, device: torch.device, batch_size: int = 1,
                      cache_mode: str = "cpu", cache_dir: str | None = None
                      ) -> tuple[dict[str, QuantizedWeight], list[dict]]:
    """Quantize the adapter's linears of every block in place (dense dequantized weights).

    Returns ``({module name: QuantizedWeight}, report rows)``. RTN ignores ``calib_ids``.
    """
    from tqdm.auto import tqdm

    blocks = adapter.get_blocks(model)
    model_dtype = next(model.parameters()).dtype
    X, block_kwargs = None, None
    if spec.method == "gptq":
        if calib_ids is None:
            raise ValueError("GPTQ needs calibration ids (N, L)")
        n, seq_len = calib_ids.shape
        X = ActivationCache(n, seq_len, model.config.get_text_config().hidden_size,
                            mode=cache_mode, path=cache_dir,
                            dtype=torch.float32 if model_dtype == torch.float32 else torch.bfloat16)
        block_kwargs = capture_block_inputs(model, adapter, calib_ids, cache=X,
                                            batch_size=batch_size, device=device)
    weights, rows = {}, []
    for i in tqdm(range(len(blocks)), desc=spec.name):
        t0 = time.time()
        block = blocks[i].to(device=device, dtype=torch.float32)
        errs = []
        for group in adapter.block_groups(block):
            H = None
            if X is not None:
                H = _group_hessian(block, adapter.get_linear(block, group[0]), X,
                                   kwargs_for_block(block_kwargs, i),
                                   batch_size=batch_size, device=device,
                                   first_token_weight=spec.first_token_weight)
            for name in group:
                lin = adapter.get_linear(block, name)
                qw = quantize_weight(lin.weight, spec, H)
                errs.append(_set_weight(lin, qw, model_dtype))
                weights[f"{adapter.blocks}.{i}.{name}"] = qw.cpu()
        if X is not None and i + 1 < len(blocks):
            _propagate(block, X, kwargs_for_block(block_kwargs, i), batch_size=batch_size,
                       device=device)
        blocks[i] = block.to(device="cpu", dtype=model_dtype)
        row = {"block": i, "weight_rel_err": sum(errs) / len(errs),
               "seconds": round(time.time() - t0, 2), "peak_gib": round(peak_memory_gib(device), 3)}
        logger.info("block %d/%d %s weight_rel_err %.4f %.1fs", i + 1, len(blocks), spec.name,
                    row["weight_rel_err"], row["seconds"])
        rows.append(row)
    if X is not None:
        X.close()
    return weights, rows


# ------------------------------------------------------------------------ save and load
def quantization_config(spec: BaselineSpec, *, quantized_modules: list[str],
                        not_converted: list[str]) -> dict[str, Any]:
    """``config.json["quantization_config"]`` of a baseline checkpoint."""
    from liftquant.io.checkpoint import LIFTQUANT_VERSION

    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
            "pack_layout": PACK_LAYOUT, "name": spec.name, "method": spec.method,
            "bits": spec.bits, "group_size": spec.group_size, "damp": spec.damp,
            "act_order": spec.act_order, "sym": spec.sym,
            "first_token_weight": spec.first_token_weight,
            "quantized_modules": sorted(quantized_modules),
            "modules_to_not_convert": sorted(not_converted),
            "liftquant_version": LIFTQUANT_VERSION}


def storage_bits(model: nn.Module, weights: dict[str, QuantizedWeight]) -> dict[str, dict]:
    """Per quantized linear: ``QuantizedWeight.storage_bits`` with its bias as side bits
    (the ``quantized=`` argument of :func:`liftquant.io.checkpoint.bits_report`)."""
    out = {}
    for name, qw in weights.items():
        bias = getattr(model.get_submodule(name), "bias", None)
        out[name] = qw.storage_bits(
            bias_bits=0 if bias is None else bias.numel() * bias.element_size() * 8)
    return out


def checkpoint_tensors(model: nn.Module, weights: dict[str, QuantizedWeight]) -> dict[str, Tensor]:
    """The model's tensors with every quantized weight replaced by its packed form."""
    from liftquant.io.checkpoint import _state_for_saving

    state = _state_for_saving(model)
    for name, qw in weights.items():
        del state[f"{name}.weight"]
        state.update(qw.state(name))
    return state


def read_quantization_config(path: str | Path) -> dict[str, Any]:
    from liftquant.io.checkpoint import CheckpointError

    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: is {path} a checkpoint folder?")
    qc = json.loads(cfg_file.read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path} is not a {QUANT_METHOD} checkpoint "
                              f"(quant_method {qc.get('quant_method')!r})")
    if qc.get("format_version") != FORMAT_VERSION or qc.get("pack_layout") != PACK_LAYOUT:
        raise CheckpointError(f"{path}: baseline format {qc.get('format_version')} / "
                              f"{qc.get('pack_layout')!r}; this liftquant reads {FORMAT_VERSION} / "
                              f"{PACK_LAYOUT!r}: re-quantize or install the matching version")
    return qc


def load_baseline(path: str | Path, *, device: torch.device | str = "cpu",
                  dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """Rebuild a baseline checkpoint as a plain HF model with dense weights (strict load)."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from liftquant.io.checkpoint import WEIGHTS_NAME, strict_load

    path = Path(path)
    qc = read_quantization_config(path)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config  # dense model after loading; transformers must not dispatch
    state = load_file(str(path / WEIGHTS_NAME))
    embed_key = next(k for k in state if k.endswith("embed_tokens.weight"))
    dtype = dtype or state[embed_key].dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name in qc["quantized_modules"]:
        lin = model.get_submodule(name)
        qw = QuantizedWeight.from_state(state, name, in_features=lin.in_features,
                                        bits=qc["bits"], group_size=qc["group_size"])
        state[f"{name}.weight"] = qw.dequantize(dtype)
    strict_load(model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                config=config, where=path)
    model.liftquant_quantization_config = qc
    model.to(device).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tok


# ------------------------------------------------------------------- the method registry
def config_from_run(cfg, model=None, adapter=None) -> tuple[BaselineSpec, None, dict]:
    """(BaselineSpec, M = None, rate_info) of a ``--method rtn|gptq`` run config."""
    lat = cfg.lattice
    extra = {} if lat.first_token_weight is None else {"first_token_weight": lat.first_token_weight}
    spec = BaselineSpec(method=lat.method, bits=lat.baseline_bits, group_size=lat.group_size,
                        damp=lat.damp, act_order=cfg.train.act_order, **extra)
    return spec, None, {"rule": f"--method {lat.method}"}


def quantize_run(model: nn.Module, calib: Tensor | None, *, cfg, spec: BaselineSpec, adapter,
                 device: torch.device, **_run: Any) -> tuple[list, dict, dict, dict]:
    """RTN/GPTQ of a run: (report rows, bits report, quantization_config, packed tensors)."""
    from liftquant.io.checkpoint import bits_report

    weights, rows = quantize_baseline(
        model, calib, spec=spec, adapter=adapter, device=device, batch_size=cfg.calib.batch_size,
        cache_mode="cpu" if cfg.calib.cache_mode == "auto" else cfg.calib.cache_mode,
        cache_dir=cfg.calib.cache_dir)
    qc = quantization_config(spec, quantized_modules=list(weights),
                             not_converted=list(adapter.skip))
    bits = bits_report(model, quantized=storage_bits(model, weights))
    return rows, bits, qc, checkpoint_tensors(model, weights)


def _load(path: str | Path, *, device: torch.device | str = "cpu",
          dtype: torch.dtype | None = None, backend: str = "auto") -> tuple[nn.Module, Any]:
    return load_baseline(path, device=device, dtype=dtype)  # dense weights: no kernel backend


register_method(QuantMethod(
    quant_method=QUANT_METHOD, names=METHODS, config_type=BaselineSpec,
    make_config=config_from_run, quantize=quantize_run, quantization_config=quantization_config,
    load=_load, needs_calibration=lambda name: name != "rtn"))
