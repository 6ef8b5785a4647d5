"""Exact size of a LiftQuant checkpoint before it is made (issue 19 item 1).

``model.safetensors`` is ``8 bytes (header length) + JSON header (padded to 8) + tensor data``.
The estimate lists the tensors the checkpoint will store with the dtypes it stores them in:

* every quantized linear as a :class:`~liftquant.core.linear.PackedLiftLinear` built on the meta
  device from its shape and *its own* lattice (packed codes uint8; scale, s1, L, R, s2_act and
  bias in ``linear.SIDE_DTYPE``), so the layer's buffers are counted by the class that owns them;
* every other persistent tensor once (tied head counted once, as ``checkpoint.unique_state``
  saves it) in ``save_dtype`` (``--save_dtype``; None: the tensor's current dtype) when it is
  floating point;
* the header: tensor names, dtypes, shapes and offsets, and the metadata that
  :func:`liftquant.io.integrity.checksum_metadata` writes (one SHA-256 per tensor), serialised the
  way safetensors does (compact JSON, padded with spaces to a multiple of 8).

The entry point is :func:`estimate_file_bytes`; :func:`runtime_memory` adds what decoding needs
beside the weights (the KV cache at a context).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from liftquant.core.lattice import LatticeSpec
from liftquant.core.linear import PackedLiftLinear
from liftquant.core.whiten import DEFAULT_BLOCK_SHAPE_RULE
from liftquant.io.checkpoint import unique_state
from liftquant.io.integrity import CHECKSUM_KEY
from liftquant.models.adapters import ModelAdapter

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.float64: "F64", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
              torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}
_SHA256_HEX = 64
TensorInfo = tuple[tuple[int, ...], torch.dtype]


def quantized_linears(model: nn.Module, adapter: ModelAdapter) -> dict[str, nn.Module]:
    """``{full module name: linear}`` of every linear the pipeline quantizes, in block order."""
    out = {}
    for i, block in enumerate(adapter.get_blocks(model)):
        for name in adapter.linear_names(block):
            out[f"{adapter.blocks}.{i}.{name}"] = adapter.get_linear(block, name)
    return out


def packed_tensors(in_features: int, out_features: int, spec: LatticeSpec, *, bias: bool,
                   block_rule: str = DEFAULT_BLOCK_SHAPE_RULE) -> dict[str, TensorInfo]:
    """``{buffer name: (shape, dtype)}`` of the PackedLiftLinear a linear becomes."""
    layer = PackedLiftLinear(in_features, out_features, spec=spec, bias=bias, device="meta",
                             block_rule=block_rule)
    return {k: (tuple(t.shape), t.dtype) for k, t in layer.state_dict().items()}


def tensor_bytes(info: Mapping[str, TensorInfo]) -> int:
    total = 0
    for shape, dtype in info.values():
        n = 1
        for s in shape:
            n *= s
        total += n * dtype.itemsize
    return total


def checkpoint_tensors(model: nn.Module, adapter: ModelAdapter,
                       specs: LatticeSpec | Mapping[str, LatticeSpec], *,
                       save_dtype: torch.dtype | None = None) -> dict[str, TensorInfo]:
    """Every tensor ``model.safetensors`` will hold, with the shape and dtype it is stored in.

    ``specs``: one lattice for all quantized linears, or ``{full module name: lattice}``.
    """
    linears = quantized_linears(model, adapter)
    out: dict[str, TensorInfo] = {}
    for name, lin in linears.items():
        spec = specs if isinstance(specs, LatticeSpec) else specs[name]
        for key, info in packed_tensors(lin.in_features, lin.out_features, spec,
                                        bias=lin.bias is not None).items():
            out[f"{name}.{key}"] = info
    for key, t in unique_state(model).items():
        if key.rsplit(".", 1)[0] in linears:
            continue
        dtype = save_dtype if save_dtype is not None and t.is_floating_point() else t.dtype
        out[key] = (tuple(t.shape), dtype)
    return out


def header_bytes(info: Mapping[str, TensorInfo]) -> int:
    """Bytes of the safetensors header of these tensors (with the length prefix and padding),
    including the per-tensor SHA-256 metadata of :func:`liftquant.io.integrity.checksum_metadata`."""
    sums = json.dumps({k: "0" * _SHA256_HEX for k in info}, sort_keys=True)
    head: dict[str, Any] = {"__metadata__": {"format": "pt", CHECKSUM_KEY: sums}}
    offset = 0
    # safetensors lays tensors out by decreasing alignment, then name; the order only moves
    # offset digits between entries, not the total length by more than a few bytes.
    for key in sorted(info, key=lambda k: (-info[k][1].itemsize, k)):
        shape, dtype = info[key]
        n = dtype.itemsize
        for s in shape:
            n *= s
        head[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    length = len(json.dumps(head, separators=(",", ":")).encode())
    return 8 + (length + 7) // 8 * 8


def estimate_file_bytes(model: nn.Module, adapter: ModelAdapter,
                        specs: LatticeSpec | Mapping[str, LatticeSpec], *,
                        save_dtype: torch.dtype | None = None) -> int:
    """Predicted size in bytes of the file ``model.safetensors`` (header included) for
    ``model`` quantized at ``specs``; :func:`liftquant.quantize.rate.estimate_checkpoint_bytes` is the
    tensor data alone (what ``checkpoint.bits_report`` calls ``total_bytes``)."""
    info = checkpoint_tensors(model, adapter, specs, save_dtype=save_dtype)
    return header_bytes(info) + tensor_bytes(info)


def size_breakdown(model: nn.Module, adapter: ModelAdapter,
                   specs: LatticeSpec | Mapping[str, LatticeSpec], *,
                   save_dtype: torch.dtype | None = None) -> dict[str, int]:
    """The estimate split into quantized linears, the rest (embeddings, head, norms) and header."""
    info = checkpoint_tensors(model, adapter, specs, save_dtype=save_dtype)
    linears = quantized_linears(model, adapter)
    quant = {k: v for k, v in info.items() if k.rsplit(".", 1)[0] in linears}
    rest = {k: v for k, v in info.items() if k not in quant}
    out = {"quantized_linears_bytes": tensor_bytes(quant), "unquantized_bytes": tensor_bytes(rest),
           "header_bytes": header_bytes(info)}
    out["total_bytes"] = sum(out.values())
    return out


def kv_cache_bytes(config: Any, *, context: int, batch: int = 1,
                   dtype: torch.dtype = torch.float16) -> int:
    """KV cache of a decoder at ``context`` tokens: 2 x layers x kv_heads x head_dim x tokens.

    Counts layers with full attention (``config.layer_types`` when present); linear-attention
    layers (Qwen3.5 Gated DeltaNet) hold a fixed-size state instead, not counted here.
    """
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    types = getattr(config, "layer_types", None)
    layers = (sum(t == "full_attention" for t in types) if types
              else config.num_hidden_layers)
    return 2 * layers * kv_heads * head_dim * context * batch * dtype.itemsize


def runtime_memory(model: nn.Module, adapter: ModelAdapter,
                   specs: LatticeSpec | Mapping[str, LatticeSpec], *, context: int,
                   save_dtype: torch.dtype | None = None, batch: int = 1,
                   kv_dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """File size, KV cache at ``context`` and their sum (weights load as stored)."""
    weights = estimate_file_bytes(model, adapter, specs, save_dtype=save_dtype)
    kv = kv_cache_bytes(model.config, context=context, batch=batch, dtype=kv_dtype)
    return {"weights_bytes": weights, "kv_cache_bytes": kv, "context": context,
            "total_bytes": weights + kv}
