import pytest
import torch

from liftquant.lattice import LatticeSpec
from liftquant.linear import LiftLinear
from liftquant.models import get_adapter, tiny_llama
from liftquant.rate import estimate_checkpoint_bytes, quantized_linear_bytes, select_lattice


def test_bits_picks_the_shipped_lattice_of_that_rate():
    spec, info = select_lattice(expc=None, bits=2.4, target_size_gb=None, device="cpu")
    assert spec.name == "24to10" and info["rule"] == "bits"
    spec, _ = select_lattice(expc=None, bits=3, target_size_gb=None, device="cpu")
    assert spec.name == "9to3"  # 9to3 and 24to8 are both 3 bits: smallest D on CPU
    with pytest.raises(ValueError, match="no shipped lattice has exactly 3.1"):
        select_lattice(expc=None, bits=3.1, target_size_gb=None)  # no longer rounded
    spec, _ = select_lattice(expc="22to8", bits=None, target_size_gb=None)
    assert spec.name == "22to8"


def test_linear_bytes_match_a_real_packed_layer():
    spec = LatticeSpec.parse("20to8")
    lin = torch.nn.Linear(100, 24, bias=True)
    layer = LiftLinear.from_linear(lin, spec=spec)
    layer.round_to_lattice(torch.randn(8, 20) / 20**0.5)
    packed = layer.pack()
    real = sum(t.numel() * t.element_size() for t in packed.state_dict().values())
    assert quantized_linear_bytes(100, 24, spec, bias=True) == real


def test_target_size_picks_largest_fitting_lattice():
    model = tiny_llama()
    adapter = get_adapter(model.config)
    sizes = {n: estimate_checkpoint_bytes(model, adapter, LatticeSpec.parse(n))
             for n in ("20to8", "24to8", "16to8")}
    assert sizes["16to8"] < sizes["20to8"] < sizes["24to8"]
    budget = (sizes["20to8"] + 1) / 1e9
    spec, info = select_lattice(expc=None, bits=None, target_size_gb=budget, model=model,
                                adapter=adapter)
    assert spec.bits_per_weight <= 2.5 and info["estimated_size_gb"] <= budget
    with pytest.raises(ValueError, match="raise --target_size_gb"):
        select_lattice(expc=None, bits=None, target_size_gb=1e-9, model=model, adapter=adapter)
