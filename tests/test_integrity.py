"""Checkpoint integrity (issue 16): per-tensor SHA-256, structural checks in both loaders,
lattice provenance, atomic saves and the output-folder rules of main.py.

The checkpoint is a tiny random Llama whose linears are swapped for randomly filled
``PackedLiftLinear`` layers (no calibration: the loaders do not care how codes were found).
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import liftquant  # noqa: F401 - registers the transformers quantizer
from liftquant.core.lattice import LatticeSpec
from liftquant.core.linear import PackedLiftLinear
from liftquant.io.checkpoint import (
    CheckpointError,
    load_quantized,
    packed_module_names,
    quantization_config,
    save_quantized,
)
from liftquant.models import tiny_llama
from liftquant.models.adapters import set_module

SPEC = LatticeSpec.parse("8to4")
IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
PROBE = "model.layers.1.mlp.up_proj"  # the module whose tensors the tests damage


def packed_tiny_llama(seed: int = 0) -> torch.nn.Module:
    """tiny_llama with every block linear replaced by a randomly filled PackedLiftLinear."""
    model = tiny_llama(seed=seed)
    g = torch.Generator().manual_seed(seed)
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    for name in names:
        lin = model.get_submodule(name)
        layer = PackedLiftLinear(lin.in_features, lin.out_features, spec=SPEC, device="cpu")
        layer.packed_signs.copy_(torch.randint(0, 256, layer.packed_signs.shape, generator=g))
        layer.scale.copy_(0.02 + 0.01 * torch.rand(layer.scale.shape, generator=g))
        layer.L.add_(0.1 * torch.randn(layer.L.shape, generator=g))
        layer.R.copy_(0.3 * torch.randn(layer.R.shape, generator=g))
        layer.backend = "torch"
        set_module(model, name, layer)
    return model.eval().requires_grad_(False)


def _qconfig(model, M=None):
    M = torch.randn(SPEC.target_dim, SPEC.lifted_dim, generator=torch.Generator().manual_seed(3)) \
        if M is None else M
    return quantization_config(spec=SPEC, M=M, quantized_modules=packed_module_names(model),
                               not_converted=["lm_head"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint folder, reference logits) of the packed tiny Llama."""
    model = packed_tiny_llama()
    folder = save_quantized(model, None, tmp_path_factory.mktemp("integrity") / "ckpt",
                            qconfig=_qconfig(model))
    with torch.no_grad():
        logits = model(IDS).logits
    return folder, logits


@pytest.fixture
def ckpt(saved, tmp_path):
    """A private copy of the saved checkpoint, free to damage."""
    return Path(shutil.copytree(saved[0], tmp_path / "ckpt"))


def _tensor_span(file: Path, name: str) -> tuple[int, int]:
    """Absolute byte range of tensor ``name`` in a safetensors file."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def _flip_bytes(file: Path, name: str) -> None:
    """Invert a few bytes in the middle of tensor ``name`` (file size unchanged)."""
    begin, end = _tensor_span(file, name)
    raw = bytearray(file.read_bytes())
    mid = (begin + end) // 2
    for i in range(mid, min(mid + 4, end)):
        raw[i] ^= 0xFF
    file.write_bytes(bytes(raw))


def _rewrite(file: Path, edit) -> None:
    """Apply ``edit(state)`` and write the file back with valid checksums for its new content,
    so the structural / finiteness checks, not the hashes, must catch the damage."""
    from liftquant.io.integrity import checksum_metadata

    state = load_file(str(file))
    edit(state)
    save_file(state, str(file), metadata=checksum_metadata(state))


def _edit_qc(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _from_pretrained(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


# ------------------------------------------------------------------------------ checksums
def test_byte_flip_in_tensor_data_refused_by_both_loaders(ckpt):
    _flip_bytes(ckpt / "model.safetensors", f"{PROBE}.packed_signs")
    message = rf"model\.safetensors: tensor '{PROBE}\.packed_signs'.*SHA-256.*verify=False"
    for load in (load_quantized, _from_pretrained):
        with pytest.raises(CheckpointError, match=message):
            load(ckpt)


def test_verify_opt_out_loads_the_flipped_file(ckpt, saved, monkeypatch):
    _flip_bytes(ckpt / "model.safetensors", f"{PROBE}.packed_signs")
    model, _ = load_quantized(ckpt, backend="torch", verify=False)
    with torch.no_grad():
        logits = model(IDS).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, saved[1])
    monkeypatch.setenv("LIFTQUANT_VERIFY", "0")
    assert isinstance(_from_pretrained(ckpt).get_submodule(PROBE), PackedLiftLinear)
    load_quantized(ckpt)  # the environment switch covers load_quantized too


def test_clean_checkpoint_round_trips_with_checksums(saved):
    folder, logits = saved
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert len(json.loads(f.metadata()["liftquant.sha256"])) == len(list(f.keys()))
    model, _ = load_quantized(folder, backend="torch")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, logits)
    hf = _from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(hf(IDS).logits, logits)


def test_nan_scale_refused_at_load_and_at_save(ckpt, tmp_path):
    _rewrite(ckpt / "model.safetensors",
             lambda s: s[f"{PROBE}.scale"].__setitem__(3, float("nan")))
    for load in (load_quantized, _from_pretrained):
        with pytest.raises(CheckpointError, match=rf"tensor '{PROBE}\.scale' holds 1 non-finite"):
            load(ckpt)
    model = packed_tiny_llama()
    model.get_submodule(PROBE).s1[0] = float("inf")
    with pytest.raises(CheckpointError, match=rf"refusing to save.*'{PROBE}\.s1'"):
        save_quantized(model, None, tmp_path / "nan", qconfig=_qconfig(model))
    assert not (tmp_path / "nan").exists()


# ------------------------------------------------------------------------------ lattice
def test_M_sha256_mismatch_refused(saved, tmp_path):
    from liftquant.apps.finetune import check_lattice
    from liftquant.core.lattice import shipped_lattices
    from liftquant.io.checkpoint import checkpoint_lattice, read_quantization_config

    qc = read_quantization_config(saved[0])
    same = tmp_path / "same"
    same.mkdir()
    M = torch.randn(SPEC.target_dim, SPEC.lifted_dim, generator=torch.Generator().manual_seed(3))
    torch.save(M, same / "8to4.pt")
    assert torch.equal(checkpoint_lattice(qc, where="c", lattice_dir=same, fix="x"), M)
    other = tmp_path / "other"
    other.mkdir()
    torch.save(M + 1e-3, other / "8to4.pt")
    with pytest.raises(CheckpointError, match=r"M_sha256.*other/8to4\.pt.*another 8to4"):
        checkpoint_lattice(qc, where=saved[0] / "config.json", lattice_dir=other, fix="x")
    # e2e fine-tuning with --expc naming a shipped lattice: its matrix must be the recorded one
    name = shipped_lattices()[0]
    spec = LatticeSpec.parse(name)
    shipped = {**qc, "lattice": name, "lifted_dim": spec.lifted_dim,
               "target_dim": spec.target_dim, "M_sha256": "0" * 64}
    with pytest.raises(CheckpointError, match=rf"ckpt/config\.json: lattice {name}.*drop --expc"):
        check_lattice(shipped, name, where="ckpt/config.json")
    check_lattice(shipped, None)  # without --expc nothing is asserted


# ------------------------------------------------------------------------------ structure
def _drop_tensor(folder: Path) -> None:
    _rewrite(folder / "model.safetensors", lambda s: s.pop(f"{PROBE}.L"))


def _drop_packed(folder: Path) -> None:
    _rewrite(folder / "model.safetensors", lambda s: s.pop(f"{PROBE}.packed_signs"))


def _short_list(folder: Path) -> None:
    mods = json.loads((folder / "config.json").read_text())["quantization_config"]
    _edit_qc(folder, quantized_modules=[m for m in mods["quantized_modules"] if m != PROBE])


@pytest.mark.parametrize("damage, message", [
    (_drop_tensor, rf"model\.safetensors lacks tensor '{PROBE}\.L'"),
    (_drop_packed, rf"model\.safetensors lacks the packed tensor '{PROBE}\.packed_signs'"),
    (_short_list, rf"model\.safetensors holds packed tensors of '{PROBE}'.*does not list"),
    (lambda f: _edit_qc(f, pack_layout="signs_msb_first_v9"),
     r"config\.json: unknown pack_layout 'signs_msb_first_v9'"),
    (lambda f: _edit_qc(f, format_version=99), r"config\.json has LiftQuant format_version 99"),
], ids=["missing-tensor", "missing-packed", "short-module-list", "pack-layout", "format-version"])
def test_from_pretrained_is_as_strict_as_load_quantized(ckpt, damage, message):
    damage(ckpt)
    for load in (_from_pretrained, load_quantized):  # each refusal names the file
        with pytest.raises(CheckpointError, match=re.escape(str(ckpt)) + "/" + message):
            load(ckpt)


# ------------------------------------------------------------------------------ atomic saves
class FailingTokenizer:
    """Writes part of its files, then fails (a full disk, a bug in a tokenizer class)."""

    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{")
        raise OSError(28, "No space left on device")


def test_failed_save_leaves_no_half_written_folder(saved, tmp_path):
    model = packed_tiny_llama()
    with pytest.raises(OSError, match="No space"):
        save_quantized(model, FailingTokenizer(), tmp_path / "new", qconfig=_qconfig(model))
    assert list(tmp_path.iterdir()) == [], "a half-written folder or temp folder was left"
    old = Path(shutil.copytree(saved[0], tmp_path / "old"))
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(OSError, match="No space"):
        save_quantized(packed_tiny_llama(seed=1), FailingTokenizer(), old, qconfig=_qconfig(model))
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_save_replaces_an_existing_folder_as_a_whole(saved, tmp_path, monkeypatch):
    from liftquant.io import integrity

    out = Path(shutil.copytree(saved[0], tmp_path / "run"))
    (out / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    (out / "quantize.log").write_text("log of this run\n")
    new = packed_tiny_llama(seed=1)
    real_rename = integrity.os.rename

    def rename_fails_on_install(src, dst):
        if ".tmp-" in str(src):
            raise OSError(5, "I/O error")
        real_rename(src, dst)

    monkeypatch.setattr(integrity.os, "rename", rename_fails_on_install)
    with pytest.raises(OSError, match="I/O error"):
        save_quantized(new, None, out, qconfig=_qconfig(new))
    assert (out / "model-00002-of-00002.safetensors").is_file()  # the old folder is back
    monkeypatch.undo()
    save_quantized(new, None, out, qconfig=_qconfig(new))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not (out / "model-00002-of-00002.safetensors").exists()
    assert (out / "quantize.log").read_text() == "log of this run\n"
    model, _ = load_quantized(out, backend="torch")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, new(IDS).logits)


# ------------------------------------------------------------------------------ run folders
def test_existing_run_folder_refused_without_overwrite(saved, tmp_path, capsys):
    import main as main_script

    out = Path(shutil.copytree(saved[0], tmp_path / "run"))
    run_json = '{"from": "the previous run"}'
    (out / "liftquant_run.json").write_text(run_json)
    argv = ["--model", str(tmp_path / "no-model"), "--save_dir", str(out), "--device", "cpu"]
    assert main_script.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "--overwrite" in err, err
    assert (out / "liftquant_run.json").read_text() == run_json
    names = {p.name for p in saved[0].iterdir()} | {"liftquant_run.json"}
    assert {p.name for p in out.iterdir()} == names  # nothing added or removed


def test_overwrite_and_resume_rules_of_write_run_config(saved, tmp_path):
    from liftquant.apps.api import write_run_config
    from liftquant.cli.config import RunArgs, RunConfig

    out = Path(shutil.copytree(saved[0], tmp_path / "run"))
    (out / "liftquant_run.json").write_text('{"old": 1}')
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        write_run_config(RunConfig(run=RunArgs(save_dir=str(out))))
    write_run_config(RunConfig(run=RunArgs(save_dir=str(out), resume=True)))
    assert json.loads((out / "liftquant_run.json").read_text()) == {"old": 1}  # kept on resume
    write_run_config(RunConfig(run=RunArgs(save_dir=str(out), overwrite=True)))
    assert json.loads((out / "liftquant_run.json").read_text())["run"]["overwrite"] is True
    fresh = tmp_path / "fresh"
    write_run_config(RunConfig(run=RunArgs(save_dir=str(fresh))))
    assert [p.name for p in fresh.iterdir()] == ["liftquant_run.json"]
