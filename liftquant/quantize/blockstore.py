"""Per-block result files under ``<save_dir>/blocks/`` (STYLE §2.7: resume) and the run
fingerprint that makes ``--resume`` refuse to mix runs (SPEC §9, "trust").

A finished block is written as ``block_XXX.safetensors`` (its packed state dict, with per-tensor
SHA-256 in the header, :mod:`liftquant.io.integrity`) plus ``block_XXX.json``
(``{"format", "row", "fingerprint"}``). The ``.safetensors`` file is renamed into place last,
so its presence marks the block as finished; ``--resume`` reloads such blocks instead of
recomputing them, after two checks:

* the block's fingerprint (:func:`run_fingerprint`: lattice, model, calibration tokens, seed,
  every result-changing setting, versions) must equal this run's, otherwise
  :class:`ResumeMismatch` names the differing keys;
* the files must be intact (:func:`is_finished`): a truncated or garbled block is deleted and
  recomputed with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from liftquant.cli.config import FORMAT_VERSION, GROUPS, RunConfig
from liftquant.core.lattice import LatticeSpec
from liftquant.core.linear import PackedLiftLinear
from liftquant.io.checkpoint import (
    BLOCK_SHAPE_RULE,
    CHECKPOINT_FORMAT_VERSION,
    LIFTQUANT_VERSION,
    tensor_sha256,
)
from liftquant.io.integrity import CheckpointError, read_header, save_safetensors, verify_checksums
from liftquant.models.adapters import ModelAdapter
from liftquant.util.log import get_logger

logger = get_logger("blockstore")

BLOCK_FORMAT = "liftquant-block/v2"  # v1: the JSON was the bare report row, no fingerprint
FINGERPRINT_VERSION = 1
#: Config fields that do not change a block's result (resources, or where an input was read
#: from: the fingerprint hashes what was read). ``run`` settings are left out except the
#: kernel backend under quantized propagation; "compat:" flags (no effect) are left out too.
NOT_IN_FINGERPRINT = {
    "model": {"model", "gguf_file", "device"},  # identity: model_sha256; device: device_type
    "calib": {"calib_dataset", "cache_mode", "cache_dir", "max_gpu_memory", "max_host_memory"},
    "lattice": {"expc", "bits", "target_size_gb", "lattice_dir"},  # -> lattice + M_sha256
}
#: Elements read from every tensor for the content sample of an in-memory model.
SAMPLE_PER_TENSOR = 64
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


class ResumeMismatch(ValueError):
    """``--resume`` found block files written by a run with other settings or inputs."""


# ------------------------------------------------------------------------------- fingerprint
def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def module_identity(model: nn.Module) -> str:
    """sha256 of the model's config, tensor names/dtypes/shapes and a strided content sample
    (:data:`SAMPLE_PER_TENSOR` elements per tensor: cheap even at 70B)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(_sha256_json({k: v for k, v in config.to_dict().items()
                               if not k.startswith("_") and k != "transformers_version"}).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        if t.device.type == "meta" or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        k = min(SAMPLE_PER_TENSOR, flat.numel())  # integer strides: float linspace rounds
        idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(1, k - 1)
        h.update(flat[idx].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def path_identity(source: str | Path) -> str:
    """sha256 of a model folder's ``config.json`` and the names and sizes of its weight files
    (a single weight file: name, size and its first/last MiB); a hub id hashes as its name."""
    p = Path(os.path.expanduser(str(source)))
    h = hashlib.sha256()
    if p.is_file():
        with open(p, "rb") as f:
            h.update(f"{p.name}:{p.stat().st_size}\n".encode() + f.read(1 << 20))
            f.seek(max(0, p.stat().st_size - (1 << 20)))
            h.update(f.read())
    elif p.is_dir():
        if (p / "config.json").is_file():
            h.update((p / "config.json").read_bytes())
        for w in sorted(x for x in p.iterdir() if x.is_file() and x.name.endswith(WEIGHT_SUFFIXES)):
            h.update(f"{w.name}:{w.stat().st_size}\n".encode())
    else:
        h.update(f"hub:{source}".encode())
    return h.hexdigest()


def _settings(cfg: RunConfig) -> dict[str, Any]:
    out = {}
    for group in ("model", "calib", "lattice", "whiten", "train"):
        values = getattr(cfg, group)
        for f in dataclasses.fields(GROUPS[group]):
            if f.name in NOT_IN_FINGERPRINT.get(group, ()) or \
                    f.metadata.get("help", "").startswith("compat:"):
                continue
            out[f"{group}.{f.name}"] = getattr(values, f.name)
    if cfg.train.propagate == "quantized":  # packed layers compute the next block's inputs
        out["run.backend"] = cfg.run.backend
    return out


def run_fingerprint(cfg: RunConfig, *, model_info: nn.Module | str | Path | dict | None,
                    calib_ids: Tensor, M: Tensor, device: torch.device | str | None = None,
                    lattice_map: dict[str, tuple[LatticeSpec, Tensor]] | None = None
                    ) -> dict[str, Any]:
    """What a block's result depends on, as a flat JSON-ready dict (dotted config keys).

    ``model_info``: the in-memory FP model (:func:`module_identity`), a model folder, weight
    file or hub id (:func:`path_identity`), or a dict describing it. ``device``: its type
    (cpu/cuda) is recorded, since ``compute_dtype=auto`` and the kernels depend on it.
    ``lattice_map``: a per-layer mix ({module: (spec, M)}); its lattices and matrices are
    recorded, so a resumed mix must have chosen the same lattice for every layer.
    """
    if isinstance(model_info, nn.Module):
        model_sha = module_identity(model_info)
    elif isinstance(model_info, dict):
        model_sha = _sha256_json(model_info)
    else:
        model_sha = None if model_info is None else path_identity(model_info)
    ids = calib_ids.detach().cpu().contiguous()
    fp = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "liftquant_version": LIFTQUANT_VERSION,
        "config_format_version": FORMAT_VERSION,
        "checkpoint_format_version": CHECKPOINT_FORMAT_VERSION,
        "block_shape_rule": BLOCK_SHAPE_RULE,
        "lattice": f"{M.shape[1]}to{M.shape[0]}",  # M is (d, D)
        "M_sha256": tensor_sha256(M),
        "model_sha256": model_sha,
        "calib_sha256": hashlib.sha256(ids.view(torch.uint8).numpy().tobytes()).hexdigest(),
        "calib_shape": list(ids.shape),
        "calib_dtype": str(ids.dtype),
        "device_type": None if device is None else torch.device(device).type,
        **_settings(cfg),
    }
    if lattice_map is not None:
        fp["lattice_map_sha256"] = _sha256_json(
            {name: [sp.name, tensor_sha256(m)] for name, (sp, m) in sorted(lattice_map.items())})
    return json.loads(json.dumps(fp, default=str))  # exactly what a block JSON reads back as


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s[:13] + '.."' if isinstance(v, str) and len(v) > 16 else s


def fingerprint_diff(old: dict | None, new: dict) -> list[str]:
    """``"key: old -> new"`` for every differing key (``old`` None: written without one)."""
    if old is None:
        return ["fingerprint: none (written by an older liftquant) -> this run's"]
    return [f"{k}: {_short(old.get(k, '(absent)'))} -> {_short(new.get(k, '(absent)'))}"
            for k in sorted(set(old) | set(new)) if old.get(k, "(absent)") != new.get(k, "(absent)")]


def _mismatch(path: Path, diff: list[str]) -> ResumeMismatch:
    return ResumeMismatch(
        f"--resume refused: {path} was written by a different run ({'; '.join(diff)}); "
        "use a new --save_dir, or --overwrite to recompute every block")


# ------------------------------------------------------------------------------- files
def block_file(blocks_dir: Path | None, i: int) -> Path | None:
    """Path of block ``i``'s result file (None when no blocks folder is used)."""
    return None if blocks_dir is None else blocks_dir / f"block_{i:03d}.safetensors"


def swap_to_packed(block: nn.Module, adapter: ModelAdapter,
                   spec: LatticeSpec | dict[str, LatticeSpec],
                   *, names: list[str] | None = None) -> None:
    """Replace the block's group linears by empty ``PackedLiftLinear`` skeletons (``spec``: one
    lattice, or one per linear name of a per-layer mix)."""
    for name in names or adapter.linear_names(block):
        lin = adapter.get_linear(block, name)
        adapter.set_module(block, name, PackedLiftLinear(
            lin.in_features, lin.out_features,
            spec=spec[name] if isinstance(spec, dict) else spec, bias=lin.bias is not None,
            device=lin.weight.device))


def save_block(path: Path, block: nn.Module, row: dict, *, fingerprint: dict | None = None) -> None:
    """Write block ``path`` atomically: JSON (row + fingerprint) first, ``.safetensors`` last."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in block.state_dict().items()}
    save_safetensors(state, tmp)
    meta = {"format": BLOCK_FORMAT, "row": row, "fingerprint": fingerprint}
    path.with_suffix(".json.tmp").write_text(json.dumps(meta, default=str))
    os.replace(path.with_suffix(".json.tmp"), path.with_suffix(".json"))
    os.replace(tmp, path)  # the .safetensors appears last: it marks the block as finished


def read_block_json(path: Path) -> dict:
    """``{"row", "fingerprint"}`` of block ``path`` (v1 files: the bare row, no fingerprint);
    ValueError/OSError when missing or garbled."""
    meta = json.loads(path.with_suffix(".json").read_text())
    if not isinstance(meta, dict):
        raise ValueError("the block JSON is not an object")  # noqa: TRY004 - bad data
    if meta.get("format") == BLOCK_FORMAT:
        if not isinstance(meta.get("row"), dict):
            raise ValueError("the block JSON has no report row")
        return meta
    return {"row": meta, "fingerprint": None}


def is_finished(path: Path | None) -> bool:
    """True when block ``path`` was finished by an earlier run and its files are intact.

    A truncated or garbled block (bad safetensors header or checksums, missing or garbled JSON)
    is deleted with a warning and reported as not finished, so it is recomputed.
    """
    if path is None or not path.is_file():
        return False
    try:
        verify_checksums(path, read_header(path), declared=True)
        read_block_json(path)
        return True
    except (CheckpointError, OSError, ValueError) as exc:
        logger.warning("resume: block file %s is unreadable (%s); recomputing that block",
                       path, str(exc).split(";")[0])
        for p in (path, path.with_suffix(".json")):
            p.unlink(missing_ok=True)
        return False


def check_resume(blocks_dir: Path, fingerprint: dict) -> int:
    """Before any block work: raise :class:`ResumeMismatch` if a finished block under
    ``blocks_dir`` belongs to another run; returns how many blocks look reusable (unreadable
    ones are left for :func:`is_finished` to recompute)."""
    n = 0
    for path in sorted(Path(blocks_dir).glob("block_*.safetensors")):
        try:
            stored = read_block_json(path)["fingerprint"]
        except (OSError, ValueError):
            continue
        diff = fingerprint_diff(stored, fingerprint)
        if diff:
            raise _mismatch(path, diff)
        n += 1
    return n


def load_finished_block(block: nn.Module, path: Path, *, adapter: ModelAdapter,
                        spec: LatticeSpec | dict[str, LatticeSpec], backend: str,
                        device: torch.device,
                        fingerprint: dict | None = None) -> dict:
    """Resume: check the fingerprint (when given), swap in packed skeletons, load the saved
    block strictly, return its report row."""
    meta = read_block_json(path)
    if fingerprint is not None:
        diff = fingerprint_diff(meta["fingerprint"], fingerprint)
        if diff:
            raise _mismatch(path, diff)
    swap_to_packed(block, adapter, spec)
    block.load_state_dict({k: v.to(device) for k, v in load_file(str(path)).items()}, strict=True)
    for m in block.modules():
        if isinstance(m, PackedLiftLinear):
            m.backend = backend
    return meta["row"]
