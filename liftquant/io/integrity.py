"""Checkpoint integrity and output folders (SPEC §9 "Trust", STYLE §2.7).

Checksums. :func:`liftquant.io.checkpoint.save_quantized` records, in the safetensors header
metadata under :data:`CHECKSUM_KEY`, a JSON object ``{tensor name: SHA-256 of its bytes as
stored}``, and ``quantization_config["tensor_checksums"] = "sha256"`` declares that the header
holds them. Both loaders (``load_quantized`` and ``from_pretrained`` through
``integrations.hf``) hash each tensor's byte range straight from the file, so every dtype
(uint8 signs, bf16 or fp32 side tensors) hashes alike and nothing is converted. Opt out for
speed with ``load_quantized(..., verify=False)`` or ``LIFTQUANT_VERIFY=0``. Checkpoints written
before checksums existed load with a warning.

Structure (always checked, cheap): the tensor names and shapes in the file against the model
skeleton built from ``config.json``, the packed modules in the file against
``quantized_modules``, and finite values in every floating tensor.

Output folders. A quantization run refuses a ``--save_dir`` that holds a previous run unless
``--resume`` or ``--overwrite`` is given (:func:`check_save_dir`); a checkpoint is built in a
hidden sibling folder and renamed into place (:func:`staging_dir`, :func:`install_dir`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from liftquant.util.log import get_logger

logger = get_logger("integrity")

CHECKSUM_KEY = "liftquant.sha256"  # safetensors header metadata key (a JSON string)
CHECKSUM_ALGO = "sha256"  # value of quantization_config["tensor_checksums"]
VERIFY_ENV = "LIFTQUANT_VERIFY"  # "0" skips hashing in both loaders; structure is still checked
HEADER_MAX_BYTES = 100 << 20  # safetensors refuses larger headers too
HASH_THREADS = 4  # hashlib releases the GIL on large buffers
PACKED_SUFFIX = ".packed_signs"
# safetensors dtype codes -> bytes per element (torch.finfo/iinfo would need a torch dtype)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# Files a checkpoint save supersedes in an existing folder; anything else (quantize.log, the
# resume files under blocks/, a user's notes) is carried over into the new folder.
CHECKPOINT_PATTERNS = ("config.json", "generation_config.json", "*.safetensors",
                       "*.safetensors.index.json", "report.json", "liftquant_run.json",
                       "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                       "chat_template.jinja", "vocab.json", "merges.txt", ".tmp-save-*")
# What marks a folder as holding a previous run (main.py refuses it without --resume/--overwrite)
RUN_MARKERS = ("config.json", "*.safetensors", "liftquant_run.json", "report.json", "blocks")


class CheckpointError(ValueError):
    """A checkpoint that is not a LiftQuant checkpoint, is corrupted, or does not match."""


class OutputDirError(FileExistsError):
    """``--save_dir`` holds another run and neither ``--resume`` nor ``--overwrite`` was given."""


OPT_OUT = f"load with verify=False or {VERIFY_ENV}=0 to skip the checksums"


def verify_default() -> bool:
    """``LIFTQUANT_VERIFY`` (default "1"): whether loaders hash the tensors."""
    value = os.environ.get(VERIFY_ENV, "1").strip().lower()
    if value not in ("0", "1"):
        raise ValueError(f"{VERIFY_ENV}={value!r}; use 0 or 1")
    return value == "1"


# ----------------------------------------------------------------------------- checksums
def tensor_bytes(t: Tensor) -> memoryview:
    """The bytes safetensors stores for ``t`` (row-major, native little-endian)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_checksums(state: Mapping[str, Tensor]) -> dict[str, str]:
    return {k: hashlib.sha256(tensor_bytes(t)).hexdigest() for k, t in state.items()}


def checksum_metadata(state: Mapping[str, Tensor]) -> dict[str, str]:
    """safetensors ``metadata`` for ``save_file``: format tag plus the per-tensor SHA-256."""
    return {"format": "pt", CHECKSUM_KEY: json.dumps(tensor_checksums(state), sort_keys=True)}


def save_safetensors(state: Mapping[str, Tensor], file: Path | str) -> None:
    """``safetensors.torch.save_file`` with :func:`checksum_metadata`, then the header made
    canonical: safetensors writes the metadata keys in hash-map order, which changes from one
    process to the next, so two identical models would give files with different bytes. The
    keys are rewritten sorted (same length, so no data offset moves) and the same seed gives the
    same file, byte for byte."""
    from safetensors.torch import save_file

    save_file(dict(state), str(file), metadata=checksum_metadata(state))
    canonicalize_header(Path(file))


def canonicalize_header(file: Path) -> None:
    """Rewrite the header of the safetensors ``file`` in place with its ``__metadata__`` keys
    sorted; tensor entries keep their order. Left as written when the rewrite would not have
    exactly the same length (it always has for headers safetensors wrote)."""
    with open(file, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        pairs = json.loads(raw, object_pairs_hook=list)
        out = []
        for key, value in pairs:
            if key == "__metadata__" and isinstance(value, list):
                value = dict(sorted(value))
            elif isinstance(value, list):
                value = dict(value)
            out.append((key, value))
        text = json.dumps(dict(out), separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n or raw.rstrip(b" ") == text:
            return
        if len(raw.rstrip(b" ")) != len(text):
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def read_header(file: Path) -> dict[str, Any]:
    """Parse a safetensors header: ``{"tensors": {name: entry}, "metadata": {...},
    "data_start": int}``; a missing, truncated or garbled file raises :class:`CheckpointError`."""
    fix = "re-save or re-download the checkpoint"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(HEADER_MAX_BYTES, size - 8):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            tensors = json.loads(f.read(n))
        if not isinstance(tensors, dict):
            raise TypeError("the header is not a JSON object")
        meta = tensors.pop("__metadata__", None) or {}
        data_len = size - 8 - n
        for name, e in tensors.items():
            begin, end = e["data_offsets"]
            numel, width = 1, DTYPE_BYTES.get(e["dtype"])
            for s in e["shape"]:
                numel *= s
            if not 0 <= begin <= end <= data_len or (width and end - begin != numel * width):
                raise ValueError(f"tensor {name!r} lies outside the file or does not fit its "
                                 "shape (truncated?)")
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file} is missing; {fix}") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read {file} ({exc}): the file is corrupted; {fix}") from exc
    return {"tensors": tensors, "metadata": meta, "data_start": 8 + n}


def verify_checksums(file: Path, header: dict[str, Any], *, declared: bool) -> None:
    """Hash every tensor of ``file`` and compare with the SHA-256 its header recorded.

    ``declared``: config.json says checksums were written, so their absence is an error;
    otherwise (a checkpoint older than checksums) a warning is logged.
    """
    raw = header["metadata"].get(CHECKSUM_KEY)
    if raw is None:
        if declared:
            raise CheckpointError(f"{file} has no {CHECKSUM_KEY} in its header although "
                                  "config.json declares tensor_checksums: the file was rewritten "
                                  f"or replaced; re-save or re-download the checkpoint, or {OPT_OUT}")
        logger.warning("%s records no tensor checksums (written before liftquant stored them): "
                       "not verified; re-save it to add them", file)
        return
    try:
        recorded = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{file}: the recorded checksums are garbled ({exc}); re-save or "
                              f"re-download the checkpoint, or {OPT_OUT}") from exc
    tensors, start = header["tensors"], header["data_start"]
    unhashed = sorted(set(tensors) - set(recorded))
    if unhashed:
        raise CheckpointError(f"{file}: tensor {unhashed[0]!r} (and {len(unhashed) - 1} more) has "
                              "no recorded checksum: it was added after saving; re-save the "
                              f"checkpoint with liftquant, or {OPT_OUT}")
    names = sorted(tensors)
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            def digest(name: str) -> str:
                b, e = tensors[name]["data_offsets"]
                return hashlib.sha256(view[start + b:start + e]).hexdigest()

            with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
                bad = [n for n, h in zip(names, pool.map(digest, names)) if h != recorded[n]]
        finally:
            view.release()
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(f"{file}: tensor {bad[0]!r}{more} does not match the SHA-256 "
                              "recorded when it was saved: the file is corrupted (bad download, "
                              f"disk or copy); re-download or re-save the checkpoint, or {OPT_OUT}")


# ----------------------------------------------------------------------------- structure
def check_tensors(file: Path, header: dict[str, Any], expected: Mapping[str, tuple[int, ...]],
                  *, quantized_modules: Iterable[str], tied: Iterable[str] = ()) -> None:
    """The file holds exactly the tensors of the skeleton (names and shapes), and packed codes
    exactly for the modules that ``quantized_modules`` lists; ``tied`` may be absent."""
    stored = header["tensors"]
    listed = set(quantized_modules)
    packed = {k[: -len(PACKED_SUFFIX)] for k in stored if k.endswith(PACKED_SUFFIX)}
    qm = "quantization_config.quantized_modules in config.json"
    if packed - listed:
        extra = sorted(packed - listed)
        raise CheckpointError(
            f"{file} holds packed tensors of {extra[0]!r} (and {len(extra) - 1} more) which {qm} "
            f"does not list ({len(listed)} listed, {len(packed)} packed in the file): config.json "
            "was edited or comes from another checkpoint; restore the checkpoint's own config.json")
    if listed - packed:
        gone = sorted(listed - packed)
        raise CheckpointError(
            f"{file} lacks the packed tensor {gone[0] + PACKED_SUFFIX!r} (and {len(gone) - 1} more "
            f"modules) that {qm} lists: the file is incomplete or from another checkpoint; "
            "re-save or re-download the checkpoint")
    missing = sorted(set(expected) - set(stored) - set(tied))
    if missing:
        raise CheckpointError(f"{file} lacks tensor {missing[0]!r} (and {len(missing) - 1} more) "
                              "that config.json's architecture needs: the file is incomplete or "
                              "from another checkpoint; re-save or re-download the checkpoint")
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise CheckpointError(f"{file} holds tensor {unexpected[0]!r} (and {len(unexpected) - 1} "
                              "more) that config.json's architecture does not have: the file and "
                              "config.json do not match (mixed checkpoint); restore both from one "
                              "checkpoint")
    for name, entry in sorted(stored.items()):
        if tuple(entry["shape"]) != tuple(expected[name]):
            raise CheckpointError(
                f"{file} does not match its config.json: tensor {name!r} has shape "
                f"{tuple(entry['shape'])} in the file but {tuple(expected[name])} from config.json "
                "(a mixed or corrupted checkpoint); restore both files from one checkpoint")
        if name.endswith(PACKED_SUFFIX) and entry["dtype"] != "U8":
            raise CheckpointError(f"{file}: packed tensor {name!r} is {entry['dtype']}, not U8: "
                                  "not a LiftQuant pack layout; re-save the checkpoint")


def check_finite(tensors: Iterable[tuple[str, Tensor]], *, where: str, fix: str) -> None:
    """Every floating tensor is finite: a NaN scale or Inf transform is refused, naming it."""
    for name, t in tensors:
        if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
            n = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{where}: tensor {name!r} holds {n} non-finite values "
                                  f"(NaN/Inf); {fix}")


# ----------------------------------------------------------------------------- output folders
def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch(name, p) for p in patterns)


def previous_run_files(folder: Path) -> list[str]:
    """Names in ``folder`` that a quantization run writes (empty when it holds none)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if _matches(p.name, RUN_MARKERS))


def check_save_dir(folder: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before any model is loaded, a ``--save_dir`` that holds another run, unless
    ``--resume`` (continue it) or ``--overwrite`` (replace it when the new one is saved).
    Whether the folder can be written is ``errors.OutputGuard.check_writable``'s check."""
    found = previous_run_files(folder)
    if found and not (resume or overwrite):
        raise OutputDirError(f"--save_dir {folder} holds a previous run ({', '.join(found)}): "
                             "pass --resume to continue it or --overwrite to replace it, or "
                             "choose another --save_dir")


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A new hidden folder ``.<name>.tmp-XXXX`` next to ``out`` (same file system, so renaming
    it into place is atomic), removed on exit unless it was installed. When the parent cannot
    be written or ``out`` is a mount point, the folder is made inside ``out`` instead."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir() and (os.path.ismount(out) or not os.access(out.parent, os.W_OK)):
            logger.warning("%s is a mount point or its parent is read-only: the checkpoint is "
                           "staged inside it and moved in file by file (not atomic)", out)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-save-", dir=out))
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except PermissionError as exc:
        raise PermissionError(f"cannot write the checkpoint {out} ({exc}): the folder is "
                              "read-only; choose another output folder") from exc
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``.

    An existing ``out`` is renamed aside, ``tmp`` renamed in, the old entries that are not
    checkpoint files (:data:`CHECKPOINT_PATTERNS`: e.g. ``quantize.log``, ``blocks/``) moved
    into the new folder, and the rest deleted. A ``tmp`` made inside ``out`` (see
    :func:`staging_dir`) is moved in file by file, ``config.json`` last.
    """
    if tmp.parent == out:
        for name in sorted((p.name for p in tmp.iterdir()), key=lambda n: n == "config.json"):
            dest = out / name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(tmp / name, dest)
        return
    if not out.exists():
        os.rename(tmp, out)
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.rename(out, aside)  # replaces the empty folder just made
    except OSError:
        aside.rmdir()
        raise
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(aside, out)  # put the old checkpoint back
        raise
    for entry in sorted(aside.iterdir()):
        if not _matches(entry.name, CHECKPOINT_PATTERNS) and not (out / entry.name).exists():
            os.rename(entry, out / entry.name)
    shutil.rmtree(aside, ignore_errors=True)
