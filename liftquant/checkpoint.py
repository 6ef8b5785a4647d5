"""Self-describing LiftQuant checkpoints: safetensors + JSON, never pickle (STYLE §2.7).

Layout of a checkpoint folder::

    config.json          HF config + "quantization_config" (quant_method "liftquant", format
                         version, pack layout, lattice, D, d, bits, block-shape rule, M's sha256,
                         quantized_modules, modules_to_not_convert, liftquant_version)
    model.safetensors    packed signs (uint8), scales, s1, s2_act, fused L/R, biases, and every
                         unquantized tensor (embeddings, norms, head)
    tokenizer files, generation_config.json, report.json, liftquant_run.json

Loading builds the model skeleton without allocating weights (accelerate's
``init_empty_weights``), swaps the listed modules for ``PackedLiftLinear`` built from shapes,
and loads with ``strict=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from liftquant.lattice import LatticeSpec
from liftquant.linear import PackedLiftLinear, cast_unquantized
from liftquant.log import get_logger
from liftquant.pack import PACK_LAYOUT
from liftquant.whiten import BLOCK_SHAPE_RULES, DEFAULT_BLOCK_SHAPE_RULE

logger = get_logger("checkpoint")

QUANT_METHOD = "liftquant"
CHECKPOINT_FORMAT_VERSION = 1
BLOCK_SHAPE_PREFIX = "whiten.block_shape/"
BLOCK_SHAPE_RULE = BLOCK_SHAPE_PREFIX + DEFAULT_BLOCK_SHAPE_RULE
LIFTQUANT_VERSION = "0.1.0"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is not a LiftQuant checkpoint, is corrupted, or does not match."""


def tensor_sha256(t: Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def quantization_config(
    *, spec: LatticeSpec, M: Tensor, quantized_modules: list[str], not_converted: list[str],
    block_rule: str = DEFAULT_BLOCK_SHAPE_RULE,
) -> dict[str, Any]:
    return {
        "quant_method": QUANT_METHOD,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "pack_layout": PACK_LAYOUT,
        "lattice": spec.name,
        "lifted_dim": spec.lifted_dim,
        "target_dim": spec.target_dim,
        "bits_per_weight": spec.bits_per_weight,
        "M_sha256": tensor_sha256(M),
        "block_shape_rule": BLOCK_SHAPE_PREFIX + block_rule,
        "quantized_modules": sorted(quantized_modules),
        "modules_to_not_convert": sorted(not_converted),
        "liftquant_version": LIFTQUANT_VERSION,
    }


def packed_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, PackedLiftLinear)]


def unique_state(model: nn.Module) -> dict[str, Tensor]:
    """``state_dict`` without tied duplicates (e.g. lm_head.weight tied to the embedding):
    what a checkpoint stores, and what safetensors accepts (it refuses shared storage)."""
    state, seen = {}, set()
    for key, t in model.state_dict().items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.device.type != "meta" and t.numel() and ptr in seen:
            continue
        seen.add(ptr)
        state[key] = t
    return state


def _state_for_saving(model: nn.Module) -> dict[str, Tensor]:
    """CPU tensors that own exactly their bytes: views into a larger buffer (the members of a
    ``kernels.groups.PackedGroup``) are copied rather than handed to safetensors as slices of
    one shared storage."""
    out = {}
    for k, t in unique_state(model).items():
        t = t.detach().contiguous().cpu()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        out[k] = t
    return out


def save_quantized(
    model: nn.Module,
    tokenizer: Any,
    out_dir: "str | Path",
    *,
    qconfig: dict[str, Any],
    report: dict[str, Any] | None = None,
    run_config: dict[str, Any] | None = None,
    tensors: dict[str, Tensor] | None = None,
) -> Path:
    """Write the checkpoint into a temp folder next to ``out_dir``, then move files in.

    ``tensors`` replaces the model's state dict as the content of ``model.safetensors`` (the
    baselines store packed integer codes instead of their dense weights).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-save-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        state = _state_for_saving(model) if tensors is None else tensors
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = model.config
        config.quantization_config = qconfig
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
        if run_config is not None:
            (tmp / "liftquant_run.json").write_text(json.dumps(run_config, indent=1))
        names = sorted(p.name for p in tmp.iterdir())
        for name in sorted(names, key=lambda n: n == "config.json"):  # config.json last
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved LiftQuant checkpoint to %s", out)
    return out


def read_quantization_config(path: "str | Path") -> dict[str, Any]:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: is {path} a checkpoint folder?")
    qc = json.loads(cfg_file.read_text()).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path} is not a LiftQuant checkpoint (quant_method "
                              f"{None if not isinstance(qc, dict) else qc.get('quant_method')!r})")
    if qc.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has LiftQuant format_version {qc.get('format_version')}, this liftquant "
            f"{LIFTQUANT_VERSION} reads version {CHECKPOINT_FORMAT_VERSION}: re-quantize or "
            "install the matching liftquant version")
    if qc.get("pack_layout") != PACK_LAYOUT:
        raise CheckpointError(f"unknown pack_layout {qc.get('pack_layout')!r}")
    block_rule_of(qc)
    return qc


def block_rule_of(qc: dict[str, Any]) -> str:
    """The ``whiten.block_shape`` rule a checkpoint's layers were built with ("v1", "v2")."""
    text = qc.get("block_shape_rule") or BLOCK_SHAPE_PREFIX + "v1"
    rule = text[len(BLOCK_SHAPE_PREFIX):] if text.startswith(BLOCK_SHAPE_PREFIX) else None
    if rule not in BLOCK_SHAPE_RULES:
        raise CheckpointError(f"block_shape_rule {text!r} is unknown to this liftquant (knows "
                              f"{[BLOCK_SHAPE_PREFIX + r for r in BLOCK_SHAPE_RULES]}): the "
                              "checkpoint was written by a newer version; upgrade liftquant")
    return rule


def build_skeleton(config: Any, qc: dict[str, Any], *, dtype: torch.dtype) -> nn.Module:
    """Model with meta parameters (real buffers) and ``PackedLiftLinear`` at the listed names."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from liftquant.models.adapters import set_module

    spec, block_rule = LatticeSpec(qc["lifted_dim"], qc["target_dim"]), block_rule_of(qc)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    modules = dict(model.named_modules())
    for name in qc["quantized_modules"]:
        lin = modules.get(name)
        if lin is None or not hasattr(lin, "in_features"):
            raise CheckpointError(f"quantized module {name!r} does not exist in this architecture")
        set_module(model, name, PackedLiftLinear(
            lin.in_features, lin.out_features, spec=spec, bias=lin.bias is not None,
            device="meta", block_rule=block_rule))
    return model


def load_quantized(
    path: "str | Path",
    *,
    device: "torch.device | str" = "cpu",
    dtype: torch.dtype | None = None,
    trainable: bool = False,
    backend: str = "auto",
) -> tuple[nn.Module, Any]:
    """Rebuild a LiftQuant model from ``path`` (strict load); returns ``(model, tokenizer)``.

    ``backend`` picks the kernels of the packed layers ("auto", "torch", "triton", "bitblas").
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    qc = read_quantization_config(path)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config  # our own loader; do not let transformers dispatch on it
    try:
        state = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path / WEIGHTS_NAME} ({exc}): the file is missing "
                              "or corrupted; re-save or re-download the checkpoint") from exc
    if dtype is None:
        dtype = next(t.dtype for k, t in state.items() if k.endswith("embed_tokens.weight"))
    model = build_skeleton(config, qc, dtype=dtype)
    tied = getattr(config, "tie_word_embeddings", False)
    expected = set(model.state_dict())
    if tied:
        for key in expected - set(state):
            if key.endswith("lm_head.weight"):
                state[key] = state[next(k for k in state if k.endswith("embed_tokens.weight"))]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match its config.json (corrupted or mixed "
                              f"checkpoint): {str(exc)[:500]}") from exc
    cast_unquantized(model, dtype)  # assign=True kept the stored dtypes of dense tensors
    if tied:
        model.tie_weights()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise CheckpointError(f"tensor {name} was not restored from the checkpoint")
    model.config.quantization_config = qc
    for m in model.modules():
        if isinstance(m, PackedLiftLinear):
            m.backend = backend
    model.to(device)
    model.eval()
    if not trainable:
        model.requires_grad_(False)
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def bits_report(model: nn.Module, *, quantized: dict[str, dict[str, int]] | None = None
                ) -> dict[str, Any]:
    """Exact storage accounting: codes + side tensors per quantized linear, and the whole model.

    Embeddings and the LM head are reported separately (a tied head costs nothing extra).
    ``quantized`` adds layers kept dense in memory but stored quantized ({module name:
    {"code_bits", "side_bits", "weights"}}, e.g. from ``baselines.storage_bits``).
    """
    layers, code, side, weights = {}, 0, 0, 0
    entries = [(n, m.storage_bits()) for n, m in model.named_modules()
               if isinstance(m, PackedLiftLinear)]
    for name, b in entries + sorted((quantized or {}).items()):
        layers[name] = {**b, "bpw_codes": b["code_bits"] / b["weights"],
                        "bpw_total": (b["code_bits"] + b["side_bits"]) / b["weights"]}
        code, side, weights = code + b["code_bits"], side + b["side_bits"], weights + b["weights"]
    embed_bits, head_bits, other_bits = 0, 0, 0
    for key, t in unique_state(model).items():
        bits = t.numel() * t.element_size() * 8
        mod = key.rsplit(".", 1)[0]
        if any(mod == n or mod.startswith(n + ".") for n in layers):
            continue
        if "embed_tokens" in key:
            embed_bits += bits
        elif "lm_head" in key:
            head_bits += bits
        else:
            other_bits += bits
    total = code + side + embed_bits + head_bits + other_bits
    return {
        "quantized_linears": {"weights": weights, "code_bits": code, "side_bits": side,
                              "bpw_codes": code / max(1, weights),
                              "bpw_total": (code + side) / max(1, weights)},
        "embeddings_bits": embed_bits, "lm_head_bits": head_bits,
        "lm_head_tied": bool(getattr(model.config, "tie_word_embeddings", False)),
        "other_bits": other_bits, "total_bytes": total // 8,
        "per_layer": layers,
    }
