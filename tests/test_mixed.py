"""Per-layer lattice mixes (issue 19 item 2): quantize, save, load strictly, decode."""

import json
import shutil

import pytest
import torch

from liftquant.cli.config import CalibArgs, LatticeArgs, RunConfig, TrainArgs
from liftquant.core.lattice import LatticeSpec, load_projection
from liftquant.core.linear import PackedLiftLinear
from liftquant.io.checkpoint import (
    MIXED_FORMAT_VERSION,
    CheckpointError,
    load_quantized,
    packed_module_names,
    quantization_config,
    save_quantized,
)
from liftquant.io.size import estimate_file_bytes, quantized_linears
from liftquant.models import get_adapter, tiny_llama
from liftquant.quantize.calibrate import quantize_model

A, B = LatticeSpec.parse("8to4"), LatticeSpec.parse("9to3")  # 2 and 3 bits, both cheap


@pytest.fixture(scope="module")
def mixed_ckpt(tiny_lattice_dir, tmp_path_factory):
    model = tiny_llama(seed=0)
    adapter = get_adapter(model.config)
    Ms = {A.name: load_projection(A, tiny_lattice_dir), B.name: load_projection(B)}
    names = list(quantized_linears(model, adapter))
    lattice_map = {n: ((A, Ms[A.name]) if i % 3 else (B, Ms[B.name]))
                   for i, n in enumerate(names)}
    specs = {n: s for n, (s, _) in lattice_map.items()}
    expected = estimate_file_bytes(model, adapter, specs)
    cfg = RunConfig(calib=CalibArgs(nsamples=8, seqlen=32, batch_size=2, seed=0),
                    lattice=LatticeArgs(expc="9to3"), train=TrainArgs(epochs=1, holdout=2))
    ids = torch.randint(0, model.config.vocab_size, (8, 32),
                        generator=torch.Generator().manual_seed(1))
    quantize_model(model, ids, cfg=cfg, M=Ms[B.name], spec=B, adapter=adapter,
                   device=torch.device("cpu"), lattice_map=lattice_map)
    qc = quantization_config(spec=B, M=Ms[B.name], quantized_modules=packed_module_names(model),
                             not_converted=[], module_lattices=lattice_map, bits_per_weight=2.3)
    out = save_quantized(model, None, tmp_path_factory.mktemp("mixed") / "ckpt", qconfig=qc)
    return model, ids, specs, out, expected


def test_each_layer_packed_with_its_lattice(mixed_ckpt):
    model, _, specs, out, expected = mixed_ckpt
    modules = dict(model.named_modules())
    for name, spec in specs.items():
        assert isinstance(modules[name], PackedLiftLinear) and modules[name].spec == spec
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == MIXED_FORMAT_VERSION and qc["lattice"] == "mixed"
    assert qc["module_lattices"] == {n: s.name for n, s in specs.items()}
    assert set(qc["lattices"]) == {"8to4", "9to3"}
    real = (out / "model.safetensors").stat().st_size
    assert abs(expected - real) <= 0.005 * real


def test_load_quantized_rebuilds_each_spec_and_decodes_the_same(mixed_ckpt):
    model, ids, specs, out, _ = mixed_ckpt
    loaded, _ = load_quantized(out, backend="torch")
    modules = dict(loaded.named_modules())
    assert all(modules[n].spec == s for n, s in specs.items())
    for m in model.modules():
        if isinstance(m, PackedLiftLinear):
            m.backend = "torch"
    with torch.no_grad():
        ref = model(ids[:2]).logits
        got = loaded(ids[:2]).logits
    torch.testing.assert_close(got.float(), ref.float())


def test_from_pretrained_loads_a_mix(mixed_ckpt):
    from transformers import AutoModelForCausalLM

    import liftquant  # noqa: F401  registers the quantizer

    _, ids, specs, out, _ = mixed_ckpt
    ref, _ = load_quantized(out, backend="torch")
    model = AutoModelForCausalLM.from_pretrained(out)
    modules = dict(model.named_modules())
    assert all(modules[n].spec == s for n, s in specs.items())
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:2]).logits.float(), ref(ids[:2]).logits.float())


def _edited(out, tmp_path, name, **changes):
    bad = tmp_path / name
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    qc = cfg["quantization_config"]
    for key, value in changes.items():
        value(qc) if callable(value) else qc.__setitem__(key, value)
    (bad / "config.json").write_text(json.dumps(cfg))
    return bad


def test_edited_mixed_configs_are_refused(mixed_ckpt, tmp_path):
    _, _, specs, out, _ = mixed_ckpt
    first_a = next(n for n, s in specs.items() if s == A)
    swap = _edited(out, tmp_path, "swap", module_lattices=lambda qc: qc["module_lattices"]
                   .__setitem__(first_a, "9to3"))
    with pytest.raises(CheckpointError, match="does not match|lacks|shape"):
        load_quantized(swap)
    drop = _edited(out, tmp_path, "drop",
                   module_lattices=lambda qc: qc["module_lattices"].pop(first_a))
    with pytest.raises(CheckpointError, match="module_lattices must name exactly"):
        load_quantized(drop)
    as_v1 = _edited(out, tmp_path, "v1", format_version=1)  # what a version-1 reader sees
    with pytest.raises(CheckpointError, match="lattice 'mixed'"):
        load_quantized(as_v1)
    unknown = _edited(out, tmp_path, "unknown", lattices=lambda qc: qc["lattices"].pop("9to3"))
    with pytest.raises(CheckpointError, match="lattices"):
        load_quantized(unknown)


def test_uniform_lattice_map_writes_a_version_1_checkpoint(tiny_lattice_dir):
    M = load_projection(A, tiny_lattice_dir)
    qc = quantization_config(spec=A, M=M, quantized_modules=["x"], not_converted=[],
                             module_lattices={"x": (A, M)})
    assert qc["format_version"] == 1 and qc["lattice"] == "8to4"


def test_cli_target_size_writes_a_mix_of_the_predicted_size(tiny_model_dir, tmp_path):
    import main as main_script
    from liftquant.io.size import estimate_file_bytes

    model = tiny_llama(seed=0)
    adapter = get_adapter(model.config)
    lo, hi = (estimate_file_bytes(model, adapter, LatticeSpec.parse(n)) for n in ("12to6", "9to3"))
    budget = (lo + hi) / 2 / 1e9
    out = tmp_path / "out"
    main_script.main(["--model", str(tiny_model_dir), "--calib_dataset",
                      str(tiny_model_dir / "corpus.txt"), "--nsamples", "4", "--seqlen", "16",
                      "--epochs", "1", "--holdout", "1", "--dtype", "float32", "--device", "cpu",
                      "--target_size_gb", f"{budget:.9f}", "--mix_lattices", "12to6,9to3",
                      "--save_dir", str(out)])
    plan = json.loads((out / "report.json").read_text())["summary"]["rate_selection"]["plan"]
    size = (out / "model.safetensors").stat().st_size
    assert size == plan["expected_bytes"] <= budget * 1e9
    assert plan["unspent_bytes"] < plan["smallest_next_step"]
    assert set(plan["counts"]) == {"12to6", "9to3"}
    loaded, _ = load_quantized(out, backend="torch")
    modules = dict(loaded.named_modules())
    assert {n: modules[n].spec.name for n in plan["module_lattices"]} == plan["module_lattices"]


def test_mixed_run_resumes_to_the_same_checkpoint_and_refuses_another_plan(tiny_lattice_dir,
                                                                        tmp_path):
    from liftquant.quantize.blockstore import ResumeMismatch, run_fingerprint

    Ms = {A.name: load_projection(A, tiny_lattice_dir), B.name: load_projection(B)}
    cfg = RunConfig(calib=CalibArgs(nsamples=8, seqlen=32, batch_size=2, seed=0),
                    lattice=LatticeArgs(expc="9to3"), train=TrainArgs(epochs=1, holdout=2))
    ids = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(1))

    def run(blocks_dir, *, resume, flip=False):
        model = tiny_llama(seed=0)
        adapter = get_adapter(model.config)
        names = list(quantized_linears(model, adapter))
        lmap = {n: ((A, Ms[A.name]) if (i % 3 == 0) == flip else (B, Ms[B.name]))
                for i, n in enumerate(names)}
        fp = run_fingerprint(cfg, model_info=model, calib_ids=ids, M=Ms[B.name],
                             device="cpu", lattice_map=lmap)
        quantize_model(model, ids, cfg=cfg, M=Ms[B.name], spec=B, adapter=adapter,
                       device=torch.device("cpu"), lattice_map=lmap, blocks_dir=blocks_dir,
                       resume=resume, fingerprint=fp)
        return {k: v.clone() for k, v in model.state_dict().items()}

    full = run(tmp_path / "a", resume=False)
    blocks = sorted((tmp_path / "a").glob("block_*.safetensors"))
    assert len(blocks) >= 2
    blocks[-1].unlink()  # the run "died" before its last block was written
    resumed = run(tmp_path / "a", resume=True)
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    with pytest.raises(ResumeMismatch, match="lattice_map_sha256"):
        run(tmp_path / "a", resume=True, flip=True)
