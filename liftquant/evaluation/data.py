"""Token tensors for calibration and evaluation (replaces GPTQ's ``datautils.get_loaders``).

Sources (``source`` argument):

* ``"wiki-offline"``: the offline corpus of :mod:`liftquant.demo.assets` (calibration or evaluation
  split of :func:`liftquant.demo.assets.wiki_offline_split`). Works without the hub.
* a local ``.txt`` file (UTF-8, used whole) or ``.jsonl`` file (one JSON object per line; its
  ``"text"`` field, else its first string field; records joined with ``"\\n\\n"``).
* ``"wikitext2"``, ``"c4"``, ``"redpajama"``: through the ``datasets`` package (imported
  lazily) and the Hugging Face hub; ``HF_DATASETS_CACHE`` is honoured. Without the hub or
  without ``datasets`` these raise :class:`DatasetUnavailableError` naming the offline fix.

Joined-text sources are tokenised once into a 1-D stream and cached as safetensors under
``<cache_root>/tokens/``; calibration draws seeded random windows from that stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from liftquant.demo import assets
from liftquant.util.fileio import atomic_write
from liftquant.util.log import get_logger, timer

logger = get_logger("data")

HUB_SOURCES = ("wikitext2", "c4", "redpajama")
LOCAL_SUFFIXES = (".txt", ".jsonl")
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
OFFLINE_FIX = "use `--calib_dataset wiki-offline` (or a local .txt/.jsonl file) instead"
LOCAL_FILE_FIX = ("give a UTF-8 .txt file or a .jsonl file of {\"text\": ...} records, or "
                  "--calib_dataset wiki-offline")
# Calibration windows are drawn at random offsets of the token stream; when the windows ask for
# more than this many times the stream's tokens (n_samples * seq_len > MAX_TOKEN_REUSE * T),
# each token is seen that often on average: calibration repeats a short text and the holdout
# error is no longer held out. A warning, not a refusal (a small text can still be useful).
MAX_TOKEN_REUSE = 2.0
PARAGRAPH_SEPARATOR = "\n\n"
# Paragraph-aligned chunk size for tokenising long texts in one batched call. For byte-level
# BPE tokenizers (GPT-2, Llama-3, Qwen, SmolLM) the chunked ids equal the ids of the whole text
# (checked on wiki-offline with SmolLM2, see _chunks); SentencePiece-style tokenizers may differ
# by a prefix space at each chunk start (one token per ~8k, immaterial for perplexity).
TOKENIZE_CHUNK_CHARS = 32_768
TOKEN_CACHE_VERSION = 2  # bump when the tokenisation rule changes
FINGERPRINT_PROBE = "LiftQuant probe: The quick brown fox, 1234 ünïcödé\n\n\tend."
# GPTQ conventions (IST-DASLab/gptq datautils.py): WikiText-2 train joined with " ", test with
# "\n\n"; C4 eval = 256 windows of 2048 tokens from random validation documents, random.seed(0).
WIKITEXT_TRAIN_SEPARATOR = " "
C4_EVAL_WINDOWS = 256
C4_EVAL_SEQ_LEN = 2048
C4_EVAL_SEED = 0
MAX_DOC_DRAWS_PER_WINDOW = 1000  # give up when documents longer than seq_len are this rare


class DatasetUnavailableError(RuntimeError):
    """A hub dataset cannot be loaded (no network, offline mode or no ``datasets`` package)."""


@dataclass(frozen=True)
class _HubSpec:
    path: str
    name: str | None
    data_files: dict[str, str] | None
    text_field: str = "text"


# Hub locations used by GPTQ/OmniQuant-style code; "c4" reads single shards like GPTQ.
_HUB: dict[tuple[str, str], _HubSpec] = {
    ("wikitext2", "train"): _HubSpec("Salesforce/wikitext", "wikitext-2-raw-v1", None),
    ("wikitext2", "test"): _HubSpec("Salesforce/wikitext", "wikitext-2-raw-v1", None),
    ("c4", "train"): _HubSpec("allenai/c4", None, {"train": "en/c4-train.00000-of-01024.json.gz"}),
    ("c4", "validation"): _HubSpec(
        "allenai/c4", None, {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    ),
    ("redpajama", "train"): _HubSpec("togethercomputer/RedPajama-Data-1T-Sample", None, None),
}


# ----------------------------------------------------------------------------- tokenisation
def _special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts *before* the text by default (e.g. ``[bos]``; often ``[]``)."""
    plain = tokenizer(FINGERPRINT_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(FINGERPRINT_PROBE)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def _chunks(text: str, max_chars: int) -> list[str]:
    """Split ``text`` at paragraph breaks into pieces of about ``max_chars``.

    ``"".join(pieces) == text``. Each piece after the first *starts* with the separator: byte-
    level BPE pre-tokenizers split ``"end.\n\nThe"`` as ``. | \n | \n | The`` (GPT-2 regex) or
    ``. | \n\n | The`` (Llama-3/Qwen regex), so a cut before the separator is a pre-token
    boundary, while a cut after it would turn ``\n | \n`` into one ``\n\n`` token.
    """
    pieces, current, size = [], [], 0
    for para in text.split(PARAGRAPH_SEPARATOR):
        if current and size + len(para) > max_chars:
            pieces.append(PARAGRAPH_SEPARATOR.join(current))
            current, size = [""], 0  # the next piece starts with the separator
        current.append(para)
        size += len(para) + len(PARAGRAPH_SEPARATOR)
    pieces.append(PARAGRAPH_SEPARATOR.join(current))
    return [p for p in pieces if p]


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids (T,) of a long text: the default special prefix (BOS) once, then the text.

    The text is encoded in paragraph-aligned chunks in one batched call, without special
    tokens per chunk and without the "sequence length is longer than the specified maximum"
    warning (``verbose=False``).
    """
    ids: list[int] = _special_prefix(tokenizer)
    pieces = _chunks(text, TOKENIZE_CHUNK_CHARS)
    if not pieces:  # empty text: a batch of no strings would fail inside the tokenizer
        return torch.tensor(ids, dtype=torch.long)
    encoded = tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"]
    for chunk_ids in encoded:
        ids.extend(chunk_ids)
    return torch.tensor(ids, dtype=torch.long)


def tokenizer_fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer for the token cache (name, size, vocab and probe hashes)."""
    vocab = sorted(tokenizer.get_vocab().items())
    vocab_hash = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    probe = tokenizer(FINGERPRINT_PROBE)["input_ids"]
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "vocab_sha256": vocab_hash,
        "probe_ids": list(probe),
    }


# ----------------------------------------------------------------------------- token cache
def _cache_file(key: dict) -> Path:
    blob = json.dumps(key, sort_keys=True, ensure_ascii=False).encode()
    digest = hashlib.sha256(blob).hexdigest()[:24]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in key["source"]["name"])[:48]
    return assets.cache_root() / "tokens" / f"{slug}-{key['split']}-{digest}.safetensors"


def _cached_tokens(key: dict, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Load the ids for ``key`` from the cache, or ``build()`` them and store them atomically."""
    path = _cache_file(key)
    if path.is_file():
        logger.debug("token cache hit %s", path)
        return load_file(str(path))["ids"].long()
    with timer() as t:
        ids = build()
    logger.info("tokenised %s/%s: %d tokens in %.1f s", key["source"]["name"], key["split"],
                ids.numel(), t["seconds"])
    meta = {"key": json.dumps(key, sort_keys=True, ensure_ascii=False)}
    # int32 halves the file; every vocabulary in use is far below 2**31.
    atomic_write(path, lambda tmp: save_file({"ids": ids.to(torch.int32).contiguous()}, tmp,
                                             metadata=meta), mode=assets.FILE_MODE)
    return ids


# ----------------------------------------------------------------------------- text sources
def _is_local(source: str) -> bool:
    return Path(source).suffix.lower() in LOCAL_SUFFIXES or Path(source).is_file()


def _read_local(path: Path) -> str:
    """Text of a local .txt file, or the joined records of a .jsonl file.

    Refuses (``ValueError`` naming the file and the fix) a file that is not UTF-8 text, holds
    NUL bytes (binary), is malformed JSON Lines, or holds no text at all.
    """
    try:
        text = _read_local_text(path)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); "
                         f"{LOCAL_FILE_FIX}") from None
    if "\x00" in text:
        raise ValueError(f"{path} holds NUL bytes, so it is a binary file; {LOCAL_FILE_FIX}")
    if not text.strip():
        raise ValueError(f"{path} holds no text; {LOCAL_FILE_FIX}")
    return text


def _read_local_text(path: Path) -> str:
    if path.suffix.lower() != ".jsonl":
        return path.read_text(encoding="utf-8")
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not a JSON record ({err.msg}); a .jsonl file "
                                 "holds one JSON object per line") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str) and isinstance(record, dict):
                text = next((v for v in record.values() if isinstance(v, str)), None)
            if text is None:
                raise ValueError(f"{path}:{lineno}: record has no string field to use as text")
            texts.append(text)
    return PARAGRAPH_SEPARATOR.join(texts)


def _source_identity(source: str) -> dict:
    """Cache identity of a source: file path + mtime + size, asset hash, or hub location."""
    if source == assets.WIKI_OFFLINE:
        return {"name": source, "sha256": assets.get_asset(source).sha256,
                "split_rule": [assets.WIKI_EVAL_EVERY, assets.WIKI_EVAL_OFFSET]}
    if source in HUB_SOURCES:
        return {"name": source,
                "hub": {"/".join(k): repr(v) for k, v in _HUB.items() if k[0] == source}}
    path = Path(source).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"calibration/eval text file not found: {path}")
    st = path.stat()
    return {"name": path.name, "path": str(path), "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def _check_source(source: str) -> None:
    if source == assets.WIKI_OFFLINE or source in HUB_SOURCES or _is_local(source):
        return
    raise ValueError(
        f"unknown data source {source!r}; use 'wiki-offline' (offline), a local .txt/.jsonl "
        f"file, or one of the hub datasets {', '.join(HUB_SOURCES)}"
    )


def _hub_dataset(source: str, split: str):
    """Load a hub dataset split lazily, turning every failure into a clear offline message."""
    spec = _HUB[(source, split)]
    try:
        import datasets
    except ImportError as err:
        raise DatasetUnavailableError(
            f"dataset {source!r} needs the `datasets` package (pip install datasets) and the "
            f"Hugging Face hub; {OFFLINE_FIX}"
        ) from err
    try:  # offline mode still works when the split is already in HF_DATASETS_CACHE
        return datasets.load_dataset(spec.path, spec.name, data_files=spec.data_files,
                                     split=split, cache_dir=os.environ.get("HF_DATASETS_CACHE"))
    except Exception as err:  # network, offline mode, auth, dataset scripts: not available here
        offline = [v for v in OFFLINE_ENV_VARS
                   if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
        why = f" ({'/'.join(offline)} is set)" if offline else ""
        raise DatasetUnavailableError(
            f"could not load dataset {source!r} ({spec.path}, split {split}) from the Hugging "
            f"Face hub{why}: {type(err).__name__}: {err}; {OFFLINE_FIX}"
        ) from err


def _joined_text(source: str, split: str) -> str:
    """The whole text of a joined-text source/split (wiki-offline, local file, wikitext2)."""
    if source == assets.WIKI_OFFLINE:
        calib, evaluation = assets.wiki_offline_split()
        return calib if split == "calibration" else evaluation
    if source == "wikitext2":
        hub_split = "train" if split == "calibration" else "test"
        sep = WIKITEXT_TRAIN_SEPARATOR if split == "calibration" else PARAGRAPH_SEPARATOR
        return sep.join(_hub_dataset("wikitext2", hub_split)["text"])
    return _read_local(Path(source).expanduser())


def _stream(tokenizer, *, source: str, split: str) -> torch.Tensor:
    """The cached 1-D token stream of a joined-text source/split."""
    key = {"version": TOKEN_CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
           "source": _source_identity(source), "split": split}
    return _cached_tokens(key, lambda: tokenize_text(tokenizer, _joined_text(source, split)))


def _document_windows(tokenizer, docs, *, n: int, seq_len: int, rng: random.Random):
    """GPTQ's C4 sampler: ``n`` windows, each from a random document with >= seq_len tokens.

    Documents are encoded with the tokenizer's default special tokens, as GPTQ does.
    """
    windows = []
    for _ in range(n):
        for _attempt in range(MAX_DOC_DRAWS_PER_WINDOW):
            ids = tokenizer(docs[rng.randint(0, len(docs) - 1)]["text"])["input_ids"]
            if len(ids) >= seq_len:
                break
        else:
            raise ValueError(f"no document with >= {seq_len} tokens found; lower seq_len")
        start = rng.randint(0, max(len(ids) - seq_len - 1, 0))
        windows.append(torch.tensor(ids[start:start + seq_len], dtype=torch.long))
    return torch.stack(windows)  # (n, seq_len)


# ----------------------------------------------------------------------------- public API
def load_calibration(
    tokenizer, *, source: str, n_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """Calibration ids (n_samples, seq_len): seeded random windows of the tokenised source.

    Joined-text sources (wiki-offline calibration split, local files, WikiText-2 train) use
    windows at uniform random offsets of the token stream (``torch.Generator`` seeded with
    ``seed``); C4 and RedPajama follow GPTQ and draw each window from a random document.
    """
    _check_source(source)
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples and seq_len must be positive, got {n_samples}, {seq_len}")
    if source in ("c4", "redpajama"):
        docs = _hub_dataset(source, "train")
        return _document_windows(tokenizer, docs, n=n_samples, seq_len=seq_len,
                                 rng=random.Random(seed))
    ids = _stream(tokenizer, source=source, split="calibration")
    _check_window_supply(source, n_tokens=ids.numel(), n_samples=n_samples, seq_len=seq_len)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=gen)
    return ids[starts[:, None] + torch.arange(seq_len)]  # (n_samples, seq_len)


def _check_window_supply(source: str, *, n_tokens: int, n_samples: int, seq_len: int) -> None:
    """Refuse a text shorter than one window; warn when windows must overlap heavily."""
    if n_tokens < seq_len:
        raise ValueError(
            f"calibration text {source!r} has {n_tokens} tokens, fewer than one window of "
            f"--seqlen {seq_len}; give a longer --calib_dataset or --seqlen <= {n_tokens}")
    reuse = n_samples * seq_len / n_tokens
    if reuse > MAX_TOKEN_REUSE:
        logger.warning(
            "calibration text %r has %d tokens but --nsamples %d x --seqlen %d asks for %d: the "
            "windows overlap heavily (each token used %.1f times on average); give a longer "
            "--calib_dataset or fewer/shorter windows", source, n_tokens, n_samples, seq_len,
            n_samples * seq_len, reuse)


def load_eval_tokens(tokenizer, *, source: str, seq_len: int = C4_EVAL_SEQ_LEN) -> torch.Tensor:
    """Evaluation ids (1, T), tokenised once and cached.

    wiki-offline: the evaluation split; a local file: the whole file; wikitext2: the test split
    joined with "\\n\\n" (GPTQ); c4: GPTQ's 256 windows of ``seq_len`` (2048) tokens from random
    validation documents, ``random.seed(0)``, concatenated. ``seq_len`` only matters for c4.
    """
    _check_source(source)
    if source == "redpajama":
        raise ValueError("redpajama has no evaluation split; use wikitext2, c4 or wiki-offline")
    if source != "c4":
        return _stream(tokenizer, source=source, split="evaluation")[None, :]
    key = {"version": TOKEN_CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
           "source": _source_identity(source), "split": "evaluation",
           "windows": [C4_EVAL_WINDOWS, seq_len, C4_EVAL_SEED]}

    def build() -> torch.Tensor:
        docs = _hub_dataset("c4", "validation")
        windows = _document_windows(tokenizer, docs, n=C4_EVAL_WINDOWS, seq_len=seq_len,
                                    rng=random.Random(C4_EVAL_SEED))
        return windows.reshape(-1)  # (256 * seq_len,)

    return _cached_tokens(key, build)[None, :]
