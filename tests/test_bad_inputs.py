"""Bad input is refused in one line that names the fix (issue 16 part 8, issue 19).

Every refusal through ``main.main`` (``sys.exit(main())`` in the script) checks the exit code
(2: refused before the model is read, 1: refused later), the one ``error: ...`` line on
stderr, and that ``--save_dir`` is left absent. Parse-level cases pass a model path that does
not exist: they must be refused before it is looked at. Model-level cases use the session's
tiny random Llama (conftest).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import types
from pathlib import Path

import pytest
import torch
from conftest import make_corpus, make_tokenizer

import main as main_script
from liftquant.demo import assets
from liftquant.evaluation import data
from liftquant.quantize import cache
from liftquant.quantize.rate import BITS_TOLERANCE, lattice_for_bits, select_lattice
from liftquant.util import errors
from liftquant.util.log import get_logger

NO_MODEL = "/nonexistent/model"  # never read by a run refused at parse level


@pytest.fixture(autouse=True)
def _isolated_token_cache_and_log_handlers(tmp_path, monkeypatch):
    """Own token cache; and no console handler left by another test writing to a closed
    capture stream (main.py attaches one to the package logger)."""
    monkeypatch.setenv(assets.HOME_ENV, str(tmp_path / "home"))
    logger = get_logger()
    saved, logger.handlers[:] = logger.handlers[:], []
    yield
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:] = saved


def _refused(capsys, argv: list[str], save_dir: Path, *, code: int) -> str:
    """Run main.py with ``argv``; assert the exit code, one error line, no output left."""
    rc = main_script.main([*argv, "--save_dir", str(save_dir)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    if code == 2:  # refused before the model is read: nothing else is printed
        assert err == lines[0] + "\n", err
    assert not save_dir.exists(), sorted(p.name for p in save_dir.iterdir())
    return lines[0]


# ----------------------------------------------------------------------------- flag values
PARSE_LEVEL = [
    (["--expc", "24x8"], "--lattice/--expc: cannot parse lattice '24x8'"),
    (["--expc", "8to8"], "impossible lattice 8to8: need lifted_dim D > target_dim d"),
    (["--expc", "64to8"], "not searchable"),
    (["--expc", "26to10"], "python lattice_generator.py --expc 26to10"),
    (["--bits", "0.5"], "shipped rates 1.6 (16to10, 32to20), 2 ("),
    (["--bits", "9"], "no shipped lattice has exactly 9 bits/weight"),
    (["--bits", "100"], "3 (9to3, 24to8)"),
    (["--bits", "1.5"], "2.142857 (30to14)"),  # 2.14 is now a per-layer mix (issue 19)
    (["--bits", "-1"], "--bits -1.0: must be > 0"),
    (["--bits", "0"], "--bits 0.0: must be > 0"),
    (["--bits", "nan"], "--bits nan: give a finite number"),
    (["--target_size_gb", "0"], "--target_size_gb 0.0: must be > 0 GB"),
    (["--target_size_gb", "-2"], "--target_size_gb -2.0: must be > 0 GB"),
    (["--epochs", "-1"], "--epochs -1: must be >= 0"),
    (["--stage2_epochs", "-1"], "--stage2_epochs -1: must be >= 0"),
    (["--nsamples", "8", "--holdout", "8"], "give --holdout < --nsamples"),
    (["--nsamples", "8", "--holdout", "20"], "--holdout 20 leaves no training sequence"),
    (["--holdout", "-1"], "--holdout -1: must be >= 0"),
    (["--nsamples", "1"], "--nsamples 1: must be >= 2"),
    (["--batch_size", "0"], "--batch_size 0: must be >= 1"),
    (["--seqlen", "4"], "--seqlen 4: must be >= 8"),
    (["--stage1_nsamples", "0"], "--stage1_nsamples 0: must be >= 1"),
    (["--lw_lr=-1e-5"], "--lr_signs/--lw_lr -1e-05: a learning rate must be >= 0"),
    (["--lt_lr", "-0.5"], "--lr_transform/--lt_lr -0.5: a learning rate must be >= 0"),
    (["--device", "gpu"], "--device 'gpu': give auto, cpu, cuda or cuda:<i>"),
    (["--max_host_memory", "0"], "--max_host_memory 0.0: must be > 0 GiB"),
]


@pytest.mark.parametrize("argv, message", PARSE_LEVEL, ids=[" ".join(a) for a, _ in PARSE_LEVEL])
def test_flag_values_refused_before_the_model_is_read(argv, message, tmp_path, capsys):
    line = _refused(capsys, ["--model", NO_MODEL, *argv], tmp_path / "out", code=2)
    assert message in line


def test_no_lattices_in_lattice_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = _refused(capsys, ["--model", NO_MODEL, "--bits", "2", "--lattice_dir",
                             str(tmp_path / "empty")], tmp_path / "out", code=2)
    assert "no lattices in" in line and "--lattice_dir" in line


def test_bad_config_file(tmp_path, capsys):
    line = _refused(capsys, ["--config", str(tmp_path / "none.json")], tmp_path / "out", code=2)
    assert line.startswith(f"error: --config {tmp_path / 'none.json'}: No such file")
    (tmp_path / "bad.json").write_text("{not json")
    line = _refused(capsys, ["--config", str(tmp_path / "bad.json")], tmp_path / "out", code=2)
    assert "--config" in line and "Expecting property name" in line


def test_unknown_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main_script.main(["--no_such_flag"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: unrecognized arguments: --no_such_flag (see ")


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(ValueError, match="no shipped lattice has exactly 9"):
        main_script.main(["--model", NO_MODEL, "--bits", "9", "--debug",
                          "--save_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- --bits rule
def test_bits_must_be_exact_and_prefers_the_practical_lattice(monkeypatch):
    assert lattice_for_bits(3, device="cpu")[0].name == "9to3"  # smallest D on CPU
    assert lattice_for_bits(2.5, device="cpu")[0].name == "20to8"
    assert lattice_for_bits(2.4, device="cpu")[0].name == "24to10"
    assert lattice_for_bits(15 / 7, device="cpu")[0].name == "30to14"
    assert lattice_for_bits(2.142857, device="cpu")[0].name == "30to14"  # as listed
    assert lattice_for_bits(2.4 + BITS_TOLERANCE / 2, device="cpu")[0].name == "24to10"
    for bits in (3.1, 2.4 + 2 * BITS_TOLERANCE, 0.5, 9, 100):
        with pytest.raises(ValueError, match="shipped rates"):
            lattice_for_bits(bits, device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    spec, info = lattice_for_bits(3, device="cuda")  # best recorded MSE on CUDA
    assert spec.name == "24to8" and info["candidates"] == ["9to3", "24to8"]
    assert select_lattice(expc=None, bits=2.5, target_size_gb=None, device="auto")[0].name \
        == "25to10"


def test_cuda_requested_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _refused(capsys, ["--model", NO_MODEL, "--device", "cuda"], tmp_path / "out", code=2)
    assert "CUDA is not available here; use --device cpu" in line


# ----------------------------------------------------------------------------- the model
def _model_argv(model_dir: Path, lattice_dir: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--lattice_dir", str(lattice_dir), "--expc", "8to4",
            "--calib_dataset", str(model_dir / "corpus.txt"), "--nsamples", "4",
            "--seqlen", "16", "--epochs", "1", "--dtype", "float32", "--device", "cpu", *extra]


def test_missing_model_and_not_a_model_folder(tmp_path, tiny_lattice_dir, capsys):
    argv = ["--expc", "8to4", "--lattice_dir", str(tiny_lattice_dir), "--device", "cpu"]
    line = _refused(capsys, ["--model", str(tmp_path / "missing"), *argv], tmp_path / "o",
                    code=1)
    assert "does not exist" in line and "a .gguf file, or a Hugging Face hub id" in line
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    line = _refused(capsys, ["--model", str(tmp_path / "notes"), *argv], tmp_path / "o", code=1)
    assert "has no config.json, so it is not a model folder" in line and "--model" in line


def test_unknown_architecture_lists_supported(tmp_path, tiny_lattice_dir, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    line = _refused(capsys, ["--model", str(tmp_path / "gpt2"), "--expc", "8to4", "--lattice_dir",
                             str(tiny_lattice_dir), "--device", "cpu"], tmp_path / "o", code=1)
    assert "model_type 'gpt2' has no liftquant adapter" in line
    assert "llama" in line and "--adapter" in line


def test_impossible_size_budget_states_the_smallest(tmp_path, tiny_model_dir, tiny_lattice_dir,
                                                    capsys):
    argv = [a for a in _model_argv(tiny_model_dir, tiny_lattice_dir) if a not in ("--expc", "8to4")]
    line = _refused(capsys, [*argv, "--target_size_gb", "1e-6"], tmp_path / "o", code=1)
    assert "--target_size_gb 1e-06: no shipped lattice fits" in line
    assert "smallest possible checkpoint is" in line and "(8to4, 2 bits/weight)" in line
    least = float(line.rsplit(" ", 1)[1])
    assert 1e-6 < least < 1e-3


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "holds no text"),
    ("blank.txt", b"\n\n  \n", "holds no text"),
    ("empty.jsonl", b"", "holds no text"),
    ("binary.txt", bytes(range(128, 256)) * 4, "is not UTF-8 text (byte 0"),
    ("nul.txt", b"the cat\x00\x01\x02", "holds NUL bytes, so it is a binary file"),
    ("bad.jsonl", b'{"text": "the fox"}\n{oops\n', "bad.jsonl:2: not a JSON record"),
    ("short.txt", b"the quick brown fox jumps over a lazy dog", "fewer than one window"),
])
def test_bad_calibration_text(name, content, message, tmp_path, tiny_model_dir,
                              tiny_lattice_dir, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    argv = _model_argv(tiny_model_dir, tiny_lattice_dir, "--calib_dataset", str(path))
    line = _refused(capsys, argv, tmp_path / "o", code=1)
    assert message in line and str(path) in line
    assert "--calib_dataset" in line or "--seqlen" in line or ".jsonl file" in line


def test_overlapping_windows_warn(tmp_path, caplog):
    tok = make_tokenizer()
    path = tmp_path / "small.txt"
    path.write_text(make_corpus(n_paragraphs=3))
    n_tokens = data.tokenize_text(tok, path.read_text()).numel()
    with caplog.at_level("WARNING", logger="liftquant.data"):
        data.load_calibration(tok, source=str(path), n_samples=4, seq_len=n_tokens // 4)
    assert not [r for r in caplog.records if "overlap" in r.getMessage()]
    with caplog.at_level("WARNING", logger="liftquant.data"):
        ids = data.load_calibration(tok, source=str(path), n_samples=32, seq_len=n_tokens // 4)
    assert ids.shape == (32, n_tokens // 4)
    assert any("windows overlap heavily" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- disk and folders
def _free(n: int):
    """A stand-in for shutil.disk_usage reporting ``n`` free bytes."""
    return lambda path: types.SimpleNamespace(total=10 * n + 10, used=9 * n + 10, free=n)


def test_check_free_space_counts_the_other_sparse_caches(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", _free(1000))
    with pytest.raises(OSError, match=r"needs 1001 bytes .* only 1000 bytes .*--cache_dir") as e:
        cache.check_free_space(tmp_path / "not" / "yet", 1001)
    assert e.value.errno == errno.ENOSPC
    cache.check_free_space(tmp_path, 1000)
    with open(tmp_path / f"other{cache.DISK_SUFFIX}", "wb") as f:
        f.truncate(1 << 20)  # sparse: 1 MiB promised, nothing written yet
    if os.stat(tmp_path / f"other{cache.DISK_SUFFIX}").st_blocks * 512 >= 1 << 20:
        pytest.skip("this filesystem does not keep sparse files")
    monkeypatch.setattr(shutil, "disk_usage", _free(1 << 20))
    with pytest.raises(OSError, match="not yet written by the other .lqcache files there"):
        cache.check_free_space(tmp_path, 1000)


def test_disk_cache_refused_on_a_full_filesystem_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", _free(100))
    with pytest.raises(OSError, match="--cache_dir"):
        cache.ActivationCache(4, 16, 64, dtype=torch.float32, mode="disk",
                              path=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_full_disk_run_refused_before_the_first_block(tmp_path, tiny_model_dir, tiny_lattice_dir,
                                                      monkeypatch, capsys):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    monkeypatch.setattr(shutil, "disk_usage", _free(2 ** 12))
    argv = _model_argv(tiny_model_dir, tiny_lattice_dir, "--cache_mode", "disk",
                       "--cache_dir", str(cache_dir))
    line = _refused(capsys, argv, tmp_path / "o", code=1)
    assert "the disk activation cache needs 16384 bytes" in line and "--cache_dir" in line
    assert list(cache_dir.iterdir()) == []


def _unwritable(monkeypatch):
    def mkstemp(**kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(errors, "tempfile", types.SimpleNamespace(mkstemp=mkstemp))


def test_read_only_save_dir_refused_before_the_model_loads(tmp_path, tiny_model_dir,
                                                          tiny_lattice_dir, monkeypatch, capsys):
    """Monkeypatched probe: works as root, where chmod does not stop writes."""
    _unwritable(monkeypatch)
    import liftquant.apps.api

    monkeypatch.setattr(liftquant.apps.api, "load_model_for_run", lambda cfg: pytest.fail("loaded"))
    line = _refused(capsys, _model_argv(tiny_model_dir, tiny_lattice_dir), tmp_path / "ro" / "o",
                    code=2)
    assert f"--save_dir {tmp_path / 'ro' / 'o'}: cannot write in {tmp_path}" in line
    assert "choose a writable --save_dir" in line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes through chmod 0o555; covered by the monkeypatched test")
def test_read_only_save_dir_with_chmod(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = _refused(capsys, ["--model", NO_MODEL, "--expc", "9to3"], ro / "o", code=2)
    finally:
        ro.chmod(0o755)
    assert "choose a writable --save_dir" in line


def test_existing_folder_keeps_its_files_and_loses_ours(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main_script.main(["--model", str(tmp_path / "missing"), "--expc", "9to3",
                           "--device", "cpu", "--save_dir", str(out)])
    assert rc in (1, 2) and "error: " in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_finished_blocks_are_kept_for_resume(tmp_path):
    guard = errors.OutputGuard(tmp_path / "a" / "b")
    (tmp_path / "a" / "b" / "blocks").mkdir(parents=True)
    (tmp_path / "a" / "b" / "liftquant_run.json").write_text(json.dumps({}))
    guard.cleanup()
    assert not (tmp_path / "a").exists()  # nothing finished: every folder it made is gone
    guard = errors.OutputGuard(tmp_path / "a" / "b")
    (tmp_path / "a" / "b" / "blocks").mkdir(parents=True)
    (tmp_path / "a" / "b" / "blocks" / "block_000.safetensors").write_bytes(b"x")
    guard.cleanup()
    assert (tmp_path / "a" / "b" / "blocks" / "block_000.safetensors").is_file()
