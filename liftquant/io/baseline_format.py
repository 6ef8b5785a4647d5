"""The checkpoint format of the RTN/GPTQ baselines ("liftquant-baseline", safetensors only) and
its loader: the ``quantization_config`` a baseline checkpoint describes itself with, its exact
storage bits, the tensors it stores and :func:`load_baseline`, which rebuilds a plain HF model
with dense weights. It may import :mod:`liftquant.util`, :mod:`liftquant.core` (the baseline math
of :mod:`liftquant.core.baseline_math`) and the rest of :mod:`liftquant.io`; never the
quantization pipeline (the baseline loop and its method registration are
:mod:`liftquant.quantize.baselines`), evaluation or the apps.

**Stored form**: per quantized linear ``<name>.qweight`` uint8 ``(bits, out, ceil(in/8))`` (bit
plane ``i`` holds bit ``i`` of every code, packed LSB first along the input dimension with
:func:`liftquant.core.pack.pack_signs`), ``<name>.scales`` float16 ``(out, G)``,
``<name>.qzeros`` uint8 ``(bits, out, ceil(G/8))`` (same bit-plane layout), ``<name>.g_idx``
int32 ``(in,)`` only with act-order and groups (the group of each input column), and
``<name>.bias`` if any; every other tensor as in the FP model. :func:`load_baseline` rebuilds
dense weights, so the loaded model is a plain HF model whose logits equal those of the model
right after quantization. Bits are counted exactly as stored: ``b`` per weight + per group 16
(scale) + ``b`` (zero) + 32 per input column for ``g_idx``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from liftquant.core.baseline_math import BaselineSpec, QuantizedWeight
from liftquant.io.checkpoint import (
    LIFTQUANT_VERSION,
    WEIGHTS_NAME,
    CheckpointError,
    _state_for_saving,
    strict_load,
)

QUANT_METHOD = "liftquant-baseline"
FORMAT_VERSION = 1
PACK_LAYOUT = "bitplanes_lsb_first_v1"


def quantization_config(spec: BaselineSpec, *, quantized_modules: list[str],
                        not_converted: list[str]) -> dict[str, Any]:
    """``config.json["quantization_config"]`` of a baseline checkpoint."""
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
    state = _state_for_saving(model)
    for name, qw in weights.items():
        del state[f"{name}.weight"]
        state.update(qw.state(name))
    return state


def read_quantization_config(path: str | Path) -> dict[str, Any]:
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

    path = Path(path)
    qc = read_quantization_config(path)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config  # dense model after loading; transformers must not dispatch
    state = load_file(str(path / WEIGHTS_NAME))
    embed_key = next(k for k in state if k.endswith("embed_tokens.weight"))
    dtype = dtype or state[embed_key].dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    from liftquant.models.moe import unfuse_experts

    unfuse_experts(model)  # MoE baselines store per-expert weights, as they were quantized
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
