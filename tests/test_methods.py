"""One quantization-method registry: --method names and config types find their handler, one
loader dispatches on the checkpoint's quant_method, and every loader ends in one strict load."""

import json

import pytest
import torch

from liftquant.apps.api import run_quantization
from liftquant.cli.config import CalibArgs, LatticeArgs, RunArgs, RunConfig, TrainArgs
from liftquant.core.latticespec import LatticeSpec
from liftquant.io.checkpoint import CheckpointError, strict_load
from liftquant.models import tiny_llama
from liftquant.quantize import methods
from liftquant.quantize.baselines import BaselineSpec


def test_names_and_config_types_find_their_handler():
    lift, gptq, rtn = (methods.get_method(n) for n in ("liftquant", "gptq", "rtn"))
    assert lift.quant_method == "liftquant" and gptq is rtn
    assert gptq.quant_method == "liftquant-baseline"
    assert methods.method_for_config(LatticeSpec.parse("8to4")) is lift
    assert methods.method_for_config(BaselineSpec(method="rtn", bits=3)) is rtn
    assert not rtn.needs_calibration("rtn") and rtn.needs_calibration("gptq")
    assert set(methods.method_names()) == {"liftquant", "rtn", "gptq"}
    with pytest.raises(ValueError, match="--method 'awq': choose one of gptq, liftquant, rtn"):
        methods.get_method("awq")


def _run(tmp_path, method: str, lattice_dir) -> tuple[torch.nn.Module, torch.Tensor]:
    model = tiny_llama(seed=0)
    ids = torch.randint(0, model.config.vocab_size, (8, 32),
                        generator=torch.Generator().manual_seed(1))
    cfg = RunConfig(calib=CalibArgs(nsamples=8, seqlen=32, batch_size=4),
                    lattice=LatticeArgs(method=method, expc="8to4", lattice_dir=str(lattice_dir),
                                        baseline_bits=3, group_size=16),
                    train=TrainArgs(epochs=0, holdout=2),
                    run=RunArgs(save_dir=str(tmp_path / method), backend="torch"))
    summary = run_quantization(cfg, model=model, tokenizer=None, calib_ids=ids)
    assert summary["method"] == method
    return model, ids


@pytest.mark.parametrize("method", ["liftquant", "rtn", "gptq"])
def test_one_loader_dispatches_on_quant_method(tmp_path, tiny_lattice_dir, method):
    model, ids = _run(tmp_path, method, tiny_lattice_dir)
    qc = json.loads((tmp_path / method / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == methods.get_method(method).quant_method
    loaded, tok = methods.load_checkpoint(tmp_path / method, backend="torch")
    assert tok is None
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_unknown_quant_method_and_missing_config_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="is .* a checkpoint folder"):
        methods.load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "awq"}}))
    with pytest.raises(ValueError, match="quant_method 'awq' is none of 'liftquant'"):
        methods.load_checkpoint(tmp_path)


def test_a_registered_method_is_dispatched(tmp_path, monkeypatch):
    """A new method needs only a registration: its checkpoints load through load_checkpoint."""
    monkeypatch.setattr(methods, "_METHODS", list(methods._registered()))

    class ToyConfig:
        pass

    toy = methods.register_method(methods.QuantMethod(
        quant_method="toy", names=("toy",), config_type=ToyConfig,
        make_config=lambda cfg, model, adapter: (ToyConfig(), None, {}),
        quantize=lambda *a, **k: ([], {}, {"quant_method": "toy"}, None),
        quantization_config=lambda *a, **k: {"quant_method": "toy"},
        load=lambda path, **kw: ("toy model", str(path))))
    assert methods.get_method("toy") is toy and methods.method_for_config(ToyConfig()) is toy
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "toy"}}))
    assert methods.load_checkpoint(tmp_path) == ("toy model", str(tmp_path))


def test_strict_load_refuses_missing_and_unexpected_tensors():
    model = tiny_llama(seed=0)
    state = dict(model.state_dict())
    key = "model.layers.0.mlp.down_proj.weight"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        strict_load(tiny_llama(seed=1), missing, config=model.config, where="ckpt")
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        strict_load(tiny_llama(seed=1), {**state, "extra.weight": torch.zeros(1)},
                    config=model.config, where="ckpt")
    fresh = tiny_llama(seed=1)
    strict_load(fresh, dict(state), config=model.config, where="ckpt")
    assert torch.equal(fresh.state_dict()[key], state[key])
