"""--resume (liftquant.quantize.blockstore): block files of another run are refused with the differing
settings named, broken block files are recomputed, and an interrupted run -- also one killed
with SIGKILL -- continues to a checkpoint bit-identical to an uninterrupted run."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from liftquant.cli.config import CalibArgs, LatticeArgs, RunConfig, TrainArgs
from liftquant.core.lattice import LatticeSpec, load_projection
from liftquant.models import get_adapter, tiny_llama
from liftquant.quantize.blockstore import (
    ResumeMismatch,
    check_resume,
    is_finished,
    read_block_json,
    run_fingerprint,
)
from liftquant.quantize.calibrate import quantize_model

ROOT = Path(__file__).resolve().parent.parent
SPEC = LatticeSpec.parse("8to4")


def _cfg(**train) -> RunConfig:
    return RunConfig(calib=CalibArgs(nsamples=8, seqlen=16, batch_size=2, seed=0),
                     lattice=LatticeArgs(expc="8to4"),
                     train=TrainArgs(**{"epochs": 1, "holdout": 2, **train}))


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(seed))


def _fingerprint(cfg, lattice_dir, *, ids=None, M=None):
    M = load_projection(SPEC, lattice_dir) if M is None else M
    return run_fingerprint(cfg, model_info=tiny_llama(seed=0), calib_ids=_ids() if ids is None
                           else ids, M=M, device="cpu")


def _run(lattice_dir, blocks: Path, *, cfg=None, resume=False, fingerprint=None):
    """Quantize a fresh tiny Llama with block files under ``blocks``; returns its state dict."""
    cfg = cfg or _cfg()
    model, M = tiny_llama(seed=0), load_projection(SPEC, lattice_dir)
    fp = fingerprint or run_fingerprint(cfg, model_info=model, calib_ids=_ids(), M=M,
                                        device="cpu")
    quantize_model(model, _ids(), cfg=cfg, M=M, spec=SPEC, adapter=get_adapter(model.config),
                   device=torch.device("cpu"), blocks_dir=blocks, resume=resume, fingerprint=fp)
    return model.state_dict()


def _assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert torch.equal(value, b[k]), k


@pytest.fixture(scope="module")
def reference(tiny_lattice_dir, tmp_path_factory):
    """An uninterrupted run: its final state and its block files."""
    blocks = tmp_path_factory.mktemp("reference") / "blocks"
    return _run(tiny_lattice_dir, blocks), blocks


def _copy_blocks(reference, tmp_path: Path) -> Path:
    return Path(shutil.copytree(reference[1], tmp_path / "blocks"))


def test_resume_of_another_run_is_refused_naming_the_differences(reference, tiny_lattice_dir,
                                                                 tmp_path):
    blocks = _copy_blocks(reference, tmp_path)
    assert check_resume(blocks, _fingerprint(_cfg(), tiny_lattice_dir)) == 2
    seed = _cfg()
    seed.calib.seed = 1
    other_lattice = load_projection(LatticeSpec.parse("9to3"))
    cases = {  # changed input -> what the message must name
        "calib.seed: 0 -> 1": _fingerprint(seed, tiny_lattice_dir),
        "train.lw_lr: 2e-05 -> 0.0001": _fingerprint(_cfg(lw_lr=1e-4), tiny_lattice_dir),
        "train.compute_dtype": _fingerprint(_cfg(compute_dtype="float32"), tiny_lattice_dir),
        "calib_sha256": _fingerprint(_cfg(), tiny_lattice_dir, ids=_ids(seed=2)),
        'lattice: "8to4" -> "9to3"': _fingerprint(_cfg(), tiny_lattice_dir, M=other_lattice),
    }
    for needle, fp in cases.items():
        with pytest.raises(ResumeMismatch) as err:
            check_resume(blocks, fp)
        msg = str(err.value)
        assert needle in msg and "\n" not in msg, msg
        assert "--save_dir" in msg and "--overwrite" in msg
    assert "M_sha256" in str(pytest.raises(ResumeMismatch, check_resume, blocks,
                                           cases['lattice: "8to4" -> "9to3"']).value)
    # the block loop itself refuses too (a fingerprint differing in several keys)
    cfg = _cfg(lw_lr=1e-4, epochs=2)
    with pytest.raises(ResumeMismatch, match=r"train\.epochs: 1 -> 2; train\.lw_lr"):
        _run(tiny_lattice_dir, blocks, cfg=cfg, resume=True)
    # resources and where inputs were read from do not change results: accepted
    same = _cfg()
    same.calib.cache_mode, same.calib.calib_dataset, same.run.save_dir = "disk", "x.txt", "y"
    same.lattice.lattice_dir = str(tiny_lattice_dir)
    assert check_resume(blocks, _fingerprint(same, tiny_lattice_dir)) == 2


def test_same_settings_resume_is_identical_and_truncated_block_recomputed(
        reference, tiny_lattice_dir, tmp_path, caplog):
    blocks = _copy_blocks(reference, tmp_path)
    data = (blocks / "block_001.safetensors").read_bytes()
    (blocks / "block_001.safetensors").write_bytes(data[: len(data) // 2])  # killed mid-copy
    with caplog.at_level(logging.WARNING, logger="liftquant"):
        state = _run(tiny_lattice_dir, blocks, resume=True)
    assert "block_001.safetensors is unreadable" in caplog.text
    _assert_equal_states(state, reference[0])
    assert is_finished(blocks / "block_001.safetensors")  # rewritten whole


def test_broken_block_files_are_not_finished(reference, tmp_path):
    src = reference[1] / "block_000.safetensors"
    good = src.read_bytes()
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF  # a bit rot inside the tensor data: the checksum catches it

    def damage_missing_json(p):
        p.with_suffix(".json").unlink()

    def damage_garbled_json(p):
        p.with_suffix(".json").write_text('{"format": "liftquant-block/v2", "ro')

    def damage_bit_flip(p):
        p.write_bytes(bytes(flipped))

    def damage_header(p):
        p.write_bytes(b"\xff" * 8 + good[8:])

    for damage in (damage_missing_json, damage_garbled_json, damage_bit_flip, damage_header):
        folder = tmp_path / damage.__name__
        folder.mkdir()
        path = folder / src.name
        shutil.copy(src, path)
        shutil.copy(src.with_suffix(".json"), path.with_suffix(".json"))
        assert is_finished(path)
        damage(path)
        assert not is_finished(path), damage.__name__
        assert not list(folder.iterdir()), "broken block files must be removed"
    assert read_block_json(src)["fingerprint"]["lattice"] == "8to4"


def test_resume_with_quantized_propagation(tiny_lattice_dir, tmp_path):
    cfg = _cfg(propagate="quantized")
    full = _run(tiny_lattice_dir, tmp_path / "blocks", cfg=cfg)
    assert read_block_json(tmp_path / "blocks" / "block_000.safetensors")["fingerprint"][
        "run.backend"] == "auto"
    for p in (tmp_path / "blocks").glob("block_001*"):
        p.unlink()  # killed during block 1
    _assert_equal_states(_run(tiny_lattice_dir, tmp_path / "blocks", cfg=cfg, resume=True), full)


def _kill_when_file_appears(proc: subprocess.Popen, path: Path, result: dict) -> None:
    deadline = time.time() + 300
    while not path.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    result["alive"] = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_kill_9_then_resume_gives_bit_identical_checkpoint(tiny_model_dir, tiny_lattice_dir,
                                                          tmp_path):
    import main as main_script

    argv = ["--model", str(tiny_model_dir), "--calib_dataset", str(tiny_model_dir / "corpus.txt"),
            "--expc", "8to4", "--lattice_dir", str(tiny_lattice_dir), "--nsamples", "8",
            "--seqlen", "32", "--epochs", "2", "--dtype", "float32", "--device", "cpu"]
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *argv, "--save_dir",
                             str(killed)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first, result = killed / "blocks" / "block_000.safetensors", {}
    watcher = threading.Thread(target=_kill_when_file_appears, args=(proc, first, result))
    watcher.start()  # the uninterrupted run below overlaps the subprocess's imports
    try:
        assert main_script.main([*argv, "--save_dir", str(tmp_path / "full")]) == 0
    finally:
        watcher.join()
    assert result["alive"], "the run ended before it could be killed"
    assert first.is_file() and not (killed / "model.safetensors").exists()
    assert main_script.main([*argv, "--save_dir", str(killed), "--resume"]) == 0
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    _assert_equal_states(a, b)
