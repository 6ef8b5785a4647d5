"""`import liftquant` makes AutoModelForCausalLM.from_pretrained load LiftQuant checkpoints."""

import pytest
import torch
from test_chat import build_chat_checkpoint

import liftquant
from liftquant.core.linear import PackedLiftLinear
from liftquant.io.checkpoint import load_quantized


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_lattice_dir):
    return build_chat_checkpoint(tmp_path_factory.mktemp("hf") / "ckpt", tiny_lattice_dir)


def test_registered_for_quant_method():
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
    )

    from liftquant.io import hf

    assert hf.register()  # idempotent
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["liftquant"] is hf.LiftQuantConfig
    assert AUTO_QUANTIZER_MAPPING["liftquant"] is hf.LiftQuantHfQuantizer


def test_from_pretrained_matches_load_quantized(ckpt):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    ref, _ = liftquant.load_quantized(ckpt, backend="torch")
    names = [n for n, m in model.named_modules() if isinstance(m, PackedLiftLinear)]
    assert sorted(names) == ref.config.quantization_config["quantized_modules"]
    assert len(names) == 7 * model.config.num_hidden_layers
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert model.model.layers[0].mlp.up_proj.packed_signs.dtype == torch.uint8
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.quantization_config.quant_method == "liftquant"
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_not_serializable_and_missing_path(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "again")
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="checkpoint folder"):
        load_quantized(tmp_path / "nowhere")
