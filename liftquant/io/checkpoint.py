"""Self-describing LiftQuant checkpoints: safetensors + JSON, never pickle (STYLE §2.7).

Layout of a checkpoint folder::

    config.json          HF config + "quantization_config" (quant_method "liftquant", format
                         version, pack layout, lattice, D, d, bits, block-shape rule, M's sha256,
                         quantized_modules, modules_to_not_convert, liftquant_version); a
                         per-layer mix (format_version 2) has lattice "mixed", a
                         "module_lattices" {module: lattice} and "lattices" {lattice: {D, d,
                         M_sha256}}; one lattice for every layer stays format_version 1
    model.safetensors    packed signs (uint8), scales, s1, s2_act, fused L/R, biases, and every
                         unquantized tensor (embeddings, norms, head)
    tokenizer files, generation_config.json, report.json, liftquant_run.json

The safetensors header records a SHA-256 per tensor (:mod:`liftquant.io.integrity`). Saving
builds the folder next to ``out_dir``, verifies it and renames it into place. Loading checks
``config.json``, hashes the tensors (``verify=False`` / ``LIFTQUANT_VERIFY=0`` skips that),
builds the model skeleton without allocating weights (accelerate's ``init_empty_weights``),
swaps the listed modules for ``PackedLiftLinear`` built from shapes, checks the file's tensor
names and shapes against it, loads with ``strict=True`` and refuses non-finite values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from liftquant.core.lattice import LatticeSpec
from liftquant.core.linear import PackedLiftLinear, cast_unquantized
from liftquant.core.pack import PACK_LAYOUT
from liftquant.core.whiten import BLOCK_SHAPE_RULES, DEFAULT_BLOCK_SHAPE_RULE
from liftquant.io.integrity import (
    CHECKSUM_ALGO,
    CheckpointError,
    check_finite,
    check_tensors,
    install_dir,
    read_header,
    save_safetensors,
    staging_dir,
    verify_checksums,
    verify_default,
)
from liftquant.util.log import get_logger

logger = get_logger("checkpoint")

QUANT_METHOD = "liftquant"
CHECKPOINT_FORMAT_VERSION = 1  # one lattice for every quantized module
MIXED_FORMAT_VERSION = 2  # a lattice per module ("module_lattices"); version-1 readers refuse it
MIXED_LATTICE = "mixed"
BLOCK_SHAPE_PREFIX = "whiten.block_shape/"
BLOCK_SHAPE_RULE = BLOCK_SHAPE_PREFIX + DEFAULT_BLOCK_SHAPE_RULE
LIFTQUANT_VERSION = "0.1.0"
WEIGHTS_NAME = "model.safetensors"


def tensor_sha256(t: Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def quantization_config(
    *, spec: LatticeSpec, M: Tensor, quantized_modules: list[str], not_converted: list[str],
    block_rule: str = DEFAULT_BLOCK_SHAPE_RULE,
    module_lattices: dict[str, tuple[LatticeSpec, Tensor]] | None = None,
    bits_per_weight: float | None = None,
) -> dict[str, Any]:
    """``config.json["quantization_config"]``. ``module_lattices`` ({module: (spec, M)}) with
    more than one lattice writes a mixed checkpoint (format_version 2); ``bits_per_weight`` is
    then the weight-averaged rate of the quantized modules."""
    lattices = {s.name: (s, m) for s, m in (module_lattices or {}).values()}
    if len(lattices) > 1:
        if set(module_lattices) != set(quantized_modules):
            raise ValueError("module_lattices must name exactly the quantized modules")
        return {
            "quant_method": QUANT_METHOD,
            "format_version": MIXED_FORMAT_VERSION,
            "pack_layout": PACK_LAYOUT,
            "lattice": MIXED_LATTICE,
            "lifted_dim": None,
            "target_dim": None,
            "bits_per_weight": bits_per_weight,
            "lattices": {n: {"lifted_dim": s.lifted_dim, "target_dim": s.target_dim,
                             "bits_per_weight": s.bits_per_weight, "M_sha256": tensor_sha256(m)}
                         for n, (s, m) in sorted(lattices.items())},
            "module_lattices": {k: module_lattices[k][0].name for k in sorted(module_lattices)},
            "block_shape_rule": BLOCK_SHAPE_PREFIX + block_rule,
            "quantized_modules": sorted(quantized_modules),
            "modules_to_not_convert": sorted(not_converted),
            "liftquant_version": LIFTQUANT_VERSION,
        }
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
    ``engine.groups.PackedGroup``) are copied rather than handed to safetensors as slices of
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
    out_dir: str | Path,
    *,
    qconfig: dict[str, Any],
    report: dict[str, Any] | None = None,
    run_config: dict[str, Any] | None = None,
    tensors: dict[str, Tensor] | None = None,
) -> Path:
    """Write the checkpoint into a hidden folder next to ``out_dir``, verify it, rename it in.

    An existing ``out_dir`` is replaced as a whole (renamed aside, then deleted), keeping only
    its entries that are not checkpoint files (``quantize.log``, ``blocks/``); if anything fails
    before the rename, ``out_dir`` is left as it was. Non-finite tensors are refused. Callers
    that must not replace another run's folder check first (``integrity.check_save_dir``).

    ``tensors`` replaces the model's state dict as the content of ``model.safetensors`` (the
    baselines store packed integer codes instead of their dense weights).
    """
    out = Path(out_dir)
    if out.is_symlink():
        out = out.resolve()  # replace the folder the link points to, keep the link
    state = _state_for_saving(model) if tensors is None else tensors
    check_finite(state.items(), where=f"refusing to save {out}",
                 fix="the model diverged during quantization or fine-tuning; re-run it")
    qconfig = {**qconfig, "tensor_checksums": CHECKSUM_ALGO}
    with staging_dir(out) as tmp:
        save_safetensors(state, tmp / WEIGHTS_NAME)
        config = model.config
        config.quantization_config = qconfig
        config.architectures = [type(model).__name__]  # as save_pretrained; build_skeleton reads it
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
        verify_checksums(tmp / WEIGHTS_NAME, read_header(tmp / WEIGHTS_NAME), declared=True)
        install_dir(tmp, out)
    logger.info("saved LiftQuant checkpoint to %s", out)
    return out


def check_quantization_config(qc: Any, *, where: str | Path) -> dict[str, Any]:
    """The ``quantization_config`` fields both loaders rely on; ``where`` names config.json."""
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise CheckpointError(f"{where}: not a LiftQuant checkpoint (quant_method {method!r})")
    reinstall = "install the liftquant version that wrote it, or re-quantize"
    if qc.get("format_version") not in (CHECKPOINT_FORMAT_VERSION, MIXED_FORMAT_VERSION):
        raise CheckpointError(
            f"{where} has LiftQuant format_version {qc.get('format_version')}, this liftquant "
            f"{LIFTQUANT_VERSION} reads versions {CHECKPOINT_FORMAT_VERSION} (one lattice) and "
            f"{MIXED_FORMAT_VERSION} (a lattice per module): {reinstall}")
    if qc.get("pack_layout") != PACK_LAYOUT:
        raise CheckpointError(f"{where}: unknown pack_layout {qc.get('pack_layout')!r} (this "
                              f"liftquant reads {PACK_LAYOUT!r}): {reinstall}")
    try:
        block_rule_of(qc)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    mixed = qc.get("format_version") == MIXED_FORMAT_VERSION
    try:
        if mixed:
            lattice_ok = qc["lattice"] == MIXED_LATTICE and all(
                (LatticeSpec.parse(n).lifted_dim, LatticeSpec.parse(n).target_dim)
                == (e["lifted_dim"], e["target_dim"]) for n, e in qc["lattices"].items())
        else:
            spec = LatticeSpec.parse(qc["lattice"])
            lattice_ok = (spec.lifted_dim, spec.target_dim) == (qc["lifted_dim"],
                                                                qc["target_dim"])
    except (KeyError, TypeError, ValueError, AttributeError):
        lattice_ok = False
    if not lattice_ok and mixed:
        raise CheckpointError(f"{where}: a mixed checkpoint (format_version "
                              f"{MIXED_FORMAT_VERSION}) needs lattice {MIXED_LATTICE!r} and a "
                              "'lattices' table whose names agree with their lifted_dim and "
                              "target_dim; restore the checkpoint's own config.json")
    if not lattice_ok:
        raise CheckpointError(f"{where}: lattice {qc.get('lattice')!r}, lifted_dim "
                              f"{qc.get('lifted_dim')!r} and target_dim {qc.get('target_dim')!r} "
                              "are missing or disagree; restore the checkpoint's own config.json")
    mods = qc.get("quantized_modules")
    if not isinstance(mods, list) or not all(isinstance(m, str) for m in mods) \
            or len(set(mods)) != len(mods):
        raise CheckpointError(f"{where}: quantized_modules must be a list of distinct module "
                              "names; restore the checkpoint's own config.json")
    if mixed:
        ml = qc.get("module_lattices")
        if not isinstance(ml, dict) or set(ml) != set(mods):
            raise CheckpointError(f"{where}: module_lattices must name exactly the "
                                  "quantized_modules; restore the checkpoint's own config.json")
        unknown = sorted({v for v in ml.values() if v not in qc["lattices"]})
        if unknown:
            raise CheckpointError(f"{where}: module_lattices uses lattice {unknown[0]!r} that "
                                  "the 'lattices' table lacks; restore the checkpoint's own "
                                  "config.json")
    return qc


def module_specs(qc: dict[str, Any]) -> dict[str, LatticeSpec]:
    """``{module: LatticeSpec}`` of a checked ``quantization_config`` (uniform or mixed)."""
    if qc.get("format_version") == MIXED_FORMAT_VERSION:
        specs = {n: LatticeSpec(e["lifted_dim"], e["target_dim"])
                 for n, e in qc["lattices"].items()}
        return {m: specs[qc["module_lattices"][m]] for m in qc["quantized_modules"]}
    spec = LatticeSpec(qc["lifted_dim"], qc["target_dim"])
    return {m: spec for m in qc["quantized_modules"]}


def read_quantization_config(path: str | Path) -> dict[str, Any]:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: is {path} a checkpoint folder?")
    try:
        qc = json.loads(cfg_file.read_text()).get("quantization_config")
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({exc}): the file is corrupted; "
                              "re-save or re-download the checkpoint") from exc
    return check_quantization_config(qc, where=cfg_file)


def verify_lattice(qc: dict[str, Any], M: Tensor, *, where: str | Path, source: str | Path,
                   fix: str) -> None:
    """``M`` (from ``source``) must be the lattice whose SHA-256 the checkpoint recorded."""
    recorded, got = qc.get("M_sha256"), tensor_sha256(M)
    if recorded is None:
        logger.warning("%s records no M_sha256: lattice %s not verified", where, qc["lattice"])
    elif got != recorded:
        raise CheckpointError(
            f"{where}: lattice {qc['lattice']} was recorded with M_sha256 {recorded[:16]}..., but "
            f"{source} hashes to {got[:16]}...: the checkpoint was quantized with another "
            f"{qc['lattice']} matrix (a regenerated lattice or another --lattice_dir); {fix}")


def checkpoint_lattice(qc: dict[str, Any], *, where: str | Path,
                       lattice_dir: str | Path | None = None, fix: str) -> Tensor | None:
    """The checkpoint's lattice M from ``lattice_dir`` (default: the shipped ``lattice/``),
    verified against ``M_sha256``; None when no lattice of that name is there."""
    from liftquant.core.lattice import lattice_path, load_projection

    if qc.get("format_version") == MIXED_FORMAT_VERSION:  # verify each; no single M to return
        for name, entry in qc["lattices"].items():
            checkpoint_lattice({**entry, "lattice": name}, where=where, lattice_dir=lattice_dir,
                               fix=fix)
        return None
    file = lattice_path(qc["lattice"], lattice_dir)
    if not file.is_file():
        logger.info("no %s to verify %s's lattice against", file, where)
        return None
    M = load_projection(qc["lattice"], lattice_dir)
    verify_lattice(qc, M, where=where, source=file, fix=fix)
    return M


def block_rule_of(qc: dict[str, Any]) -> str:
    """The ``whiten.block_shape`` rule a checkpoint's layers were built with ("v1", "v2")."""
    text = qc.get("block_shape_rule") or BLOCK_SHAPE_PREFIX + "v1"
    rule = text[len(BLOCK_SHAPE_PREFIX):] if text.startswith(BLOCK_SHAPE_PREFIX) else None
    if rule not in BLOCK_SHAPE_RULES:
        raise CheckpointError(f"block_shape_rule {text!r} is unknown to this liftquant (knows "
                              f"{[BLOCK_SHAPE_PREFIX + r for r in BLOCK_SHAPE_RULES]}): the "
                              "checkpoint was written by a newer version; upgrade liftquant")
    return rule


def _saved_architecture(config: Any) -> type | None:
    """The transformers class recorded in ``config.architectures`` when it is not the one
    ``AutoModelForCausalLM`` would build (e.g. Qwen3_5ForConditionalGeneration, whose config
    AutoModelForCausalLM maps to the text-only Qwen3_5ForCausalLM); None otherwise."""
    import transformers

    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if len(names) == 1 else None
    if cls is None or not hasattr(cls, "_from_config"):
        return None
    if not isinstance(config, getattr(cls, "config_class", None) or type(None)):
        return None
    return cls


def build_skeleton(config: Any, qc: dict[str, Any], *, dtype: torch.dtype) -> nn.Module:
    """Model with meta parameters (real buffers) and ``PackedLiftLinear`` at the listed names."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cls = _saved_architecture(config)
    with init_empty_weights(include_buffers=False):
        model = (cls._from_config(config, dtype=dtype) if cls is not None
                 else AutoModelForCausalLM.from_config(config, dtype=dtype))
    swap_packed(model, qc)
    return model


def swap_packed(model: nn.Module, qc: dict[str, Any], *, backend: str | None = None) -> None:
    """The one swap of every loader (``load_quantized``, ``from_pretrained``): each module
    listed in ``qc["quantized_modules"]`` becomes a meta-device ``PackedLiftLinear`` of its
    shapes and lattice (MoE fused experts are first unfused into per-expert linears)."""
    from liftquant.models.adapters import set_module
    from liftquant.models.moe import unfuse_experts

    specs, block_rule = module_specs(qc), block_rule_of(qc)
    unfuse_experts(model)  # MoE checkpoints store per-expert packed linears
    modules = dict(model.named_modules())
    for name in qc["quantized_modules"]:
        lin = modules.get(name)
        if lin is None or not hasattr(lin, "in_features"):
            raise CheckpointError(f"quantized module {name!r} does not exist in this "
                                  f"architecture ({type(model).__name__})")
        layer = PackedLiftLinear(lin.in_features, lin.out_features, spec=specs[name],
                                 bias=lin.bias is not None, device="meta", block_rule=block_rule)
        if backend is not None:
            layer.backend = backend
        set_module(model, name, layer)
    if qc.get("lm_head"):  # an 8-bit head (scripts/quantize_lm_head.py)
        from liftquant.kernels.int8_head import swap_int8_head

        try:
            swap_int8_head(model, qc["lm_head"])
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc


def strict_load(model: nn.Module, state: dict[str, Tensor], *, config: Any, where: str | Path,
                cast: Any = None) -> None:
    """The one strict load of every checkpoint loader: a tied LM head omitted from the file is
    filled from the embedding, ``load_state_dict(strict=True, assign=True)``, then ``cast``
    (a callable on the model, e.g. the dtype of dense tensors) and ``tie_weights``; a missing,
    unexpected or mis-shaped tensor, or one left on meta, is a :class:`CheckpointError`."""
    tied = tied_keys(config, model.state_dict())
    for key in tied - set(state):
        state[key] = state[next(k for k in state if k.endswith("embed_tokens.weight"))]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{where} does not match its config.json (corrupted or mixed "
                              f"checkpoint): {str(exc)[:500]}") from exc
    if cast is not None:
        cast(model)
    if tied:
        model.tie_weights()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise CheckpointError(f"{where}: tensor {name} was not restored from the checkpoint")


def tied_keys(config: Any, keys: Any) -> set[str]:
    """State-dict keys a checkpoint may omit because they are tied (the LM head)."""
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    return {k for k in keys if k.endswith("lm_head.weight")}


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


NONFINITE_FIX = ("the checkpoint was saved from a diverged run or edited; re-quantize (or "
                 "re-run fine-tuning with a lower learning rate)")


def load_quantized(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    trainable: bool = False,
    backend: str = "auto",
    verify: bool | None = None,
    host_embed: bool = False,
) -> tuple[nn.Module, Any]:
    """Rebuild a LiftQuant model from ``path`` (strict load); returns ``(model, tokenizer)``.

    ``host_embed``: the token embedding table stays in host memory and never reaches
    ``device`` (for the step engine's ``host_embed``, e.g. a 70B model on a 24 GB GPU); refused
    for checkpoints whose head shares the table.

    ``backend`` picks the kernels of the packed layers ("auto", "torch", "triton", "bitblas").
    ``verify`` hashes every tensor against the SHA-256 recorded at save (default: on, unless
    ``LIFTQUANT_VERIFY=0``); names, shapes, the module list and finiteness are always checked.
    Every refusal is a :class:`CheckpointError` naming the file, the tensor and the fix.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    qc = read_quantization_config(path)
    weights = path / WEIGHTS_NAME
    header = read_header(weights)
    if verify_default() if verify is None else verify:
        verify_checksums(weights, header, declared=qc.get("tensor_checksums") == CHECKSUM_ALGO)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config  # our own loader; do not let transformers dispatch on it
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {weights} ({exc}): the file is missing "
                              "or corrupted; re-save or re-download the checkpoint") from exc
    if dtype is None:
        dtype = next((t.dtype for k, t in state.items() if k.endswith("embed_tokens.weight")),
                     torch.float32)
    model = build_skeleton(config, qc, dtype=dtype)
    expected = expected_shapes(model)
    tied = tied_keys(config, expected)
    check_tensors(weights, header, expected, quantized_modules=qc["quantized_modules"], tied=tied)
    check_finite(state.items(), where=str(weights), fix=NONFINITE_FIX)
    # assign=True keeps the stored dtypes of dense tensors: cast them to ``dtype``
    strict_load(model, state, config=config, where=path,
                cast=lambda m: cast_unquantized(m, dtype))
    model.config.quantization_config = qc
    for m in model.modules():
        if isinstance(m, PackedLiftLinear):
            m.backend = backend
    if host_embed:
        embed = model.get_input_embeddings()
        head = getattr(model.get_output_embeddings(), "weight", None)
        if head is not None and head.data_ptr() == embed.weight.data_ptr():
            raise CheckpointError(f"{path}: the head shares the embedding table (tied "
                                  "weights), so the table cannot stay on the host; load "
                                  "without host_embed (--host_embed off)")
        model.set_input_embeddings(None)  # model.to below leaves it on the host
        model.to(device)
        model.set_input_embeddings(embed)
    else:
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
