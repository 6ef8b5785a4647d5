import pytest
import torch

from liftquant.core.lattice import LatticeSpec
from liftquant.core.linear import LiftLinear
from liftquant.io.size import estimate_file_bytes, quantized_linears
from liftquant.models import get_adapter, tiny_llama
from liftquant.quantize.rate import (
    layer_sensitivity,
    mix_candidates,
    plan_mix,
    quantized_linear_bytes,
    select_lattice,
)


def test_bits_picks_the_shipped_lattice_of_that_rate():
    spec, info = select_lattice(expc=None, bits=2.4, target_size_gb=None, device="cpu")
    assert spec.name == "24to10" and info["rule"] == "bits"
    spec, _ = select_lattice(expc=None, bits=3, target_size_gb=None, device="cpu")
    assert spec.name == "9to3"  # 9to3 and 24to8 are both 3 bits: smallest D on CPU
    with pytest.raises(ValueError, match="no shipped lattice has exactly 3.1"):
        select_lattice(expc=None, bits=3.1, target_size_gb=None)  # above the range: refused
    spec, _ = select_lattice(expc="22to8", bits=None, target_size_gb=None)
    assert spec.name == "22to8"


@pytest.mark.slow
def test_linear_bytes_match_a_real_packed_layer():
    spec = LatticeSpec.parse("20to8")
    lin = torch.nn.Linear(100, 24, bias=True)
    layer = LiftLinear.from_linear(lin, spec=spec)
    layer.round_to_lattice(torch.randn(8, 20) / 20**0.5)
    packed = layer.pack()
    real = sum(t.numel() * t.element_size() for t in packed.state_dict().values())
    assert quantized_linear_bytes(100, 24, spec, bias=True) == real


def _plan(model, adapter, request, **kw):
    return plan_mix(model, adapter, request, **kw)


def test_target_size_plans_a_mix_that_fills_the_budget():
    model = tiny_llama()
    adapter = get_adapter(model.config)
    cands = ["16to8", "20to8", "24to8"]  # the GPU ladder around the budgets below
    sizes = {n: estimate_file_bytes(model, adapter, LatticeSpec.parse(n)) for n in cands}
    assert sizes["16to8"] < sizes["20to8"] < sizes["24to8"]
    for budget in ((sizes["20to8"] + sizes["24to8"]) / 2, sizes["20to8"] + 1):
        spec, info = select_lattice(expc=None, bits=None, target_size_gb=budget / 1e9,
                                    model=model, adapter=adapter, device="cpu",
                                    mix_lattices=",".join(cands))
        assert spec is None and info["rule"] == "target_size_gb" and info["mix"]["kind"] == "bytes"
        assert info["mix"]["candidates"] == cands
        plan = _plan(model, adapter, info["mix"])
        est = estimate_file_bytes(model, adapter, plan.specs)
        assert est == plan.info["expected_bytes"] <= int(budget)
        # filled to within one layer's step: no remaining upgrade fits
        assert plan.info["unspent_bytes"] < plan.info["smallest_next_step"]
        assert 0.0 < plan.bits_per_weight <= 3.0
    with pytest.raises(ValueError, match="raise --target_size_gb"):
        select_lattice(expc=None, bits=None, target_size_gb=1e-9, model=model, adapter=adapter)


def test_bits_average_between_rates_is_a_mix_and_outside_is_refused():
    model = tiny_llama()
    adapter = get_adapter(model.config)
    spec, info = select_lattice(expc=None, bits=2.37, target_size_gb=None, device="cpu")
    assert spec is None and info["rule"] == "bits_average"
    plan = _plan(model, adapter, info["mix"])
    step = max(w for w in plan.weights.values()) * 1.0 / sum(plan.weights.values())
    assert 2.37 - step <= plan.bits_per_weight <= 2.37 + 1e-9
    assert len(plan.lattices) >= 2
    for bits in (1.5, 3.01, 9):
        with pytest.raises(ValueError, match="shipped rates"):
            select_lattice(expc=None, bits=bits, target_size_gb=None, device="cpu")


def test_mix_spends_bits_on_sensitive_layers():
    model = tiny_llama()
    adapter = get_adapter(model.config)
    names = list(quantized_linears(model, adapter))
    sens = {n: (100.0 if "down_proj" in n else 1.0) for n in names}
    plan = _plan(model, adapter, {"kind": "bits", "bits": 2.3, "candidates": ["12to6", "9to3"]},
                 sensitivity=sens)
    down = [plan.specs[n].bits_per_weight for n in names if "down_proj" in n]
    rest = [plan.specs[n].bits_per_weight for n in names if "down_proj" not in n]
    assert min(down) >= max(rest) and min(down) == 3.0


def test_sensitivity_pass_measures_input_energy():
    model = tiny_llama()
    adapter = get_adapter(model.config)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    sens = layer_sensitivity(model, adapter, ids, proxy="energy")
    lins = quantized_linears(model, adapter)
    assert set(sens) == set(lins)
    name = next(iter(lins))
    inputs = []
    h = lins[name].register_forward_pre_hook(lambda _m, a: inputs.append(a[0].square().mean()))
    with torch.no_grad():
        for row in ids:
            model(row[None], use_cache=False)
    h.remove()
    brute = float(lins[name].weight.detach().square().sum()) * float(torch.stack(inputs).mean())
    assert sens[name] == pytest.approx(brute, rel=1e-5)


def _fisher_brute_force(model, name, ids):
    """sum over sequences and tokens of mean_i(y_ti^2) * ||dL/dy_t||^2 for one linear, with the
    gradient taken by autograd against a zero perturbation added to its output."""
    lin = dict(model.named_modules())[name]
    total = 0.0
    for row in ids:
        box = {}

        def hook(_m, _a, out, box=box):
            box["y"] = out.detach()
            box["delta"] = torch.zeros_like(out, requires_grad=True)
            return out + box["delta"]

        h = lin.register_forward_hook(hook)
        logits = model(row[None], use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 row[1:])
        (g,) = torch.autograd.grad(loss, box["delta"])
        h.remove()
        total += float((box["y"].square().mean(-1) * g.square().sum(-1)).sum())
    return total


def test_fisher_sensitivity_matches_autograd_brute_force_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = tiny_llama()
    adapter = get_adapter(model.config)
    ids = torch.randint(0, model.config.vocab_size, (3, 16))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    sens = layer_sensitivity(model, adapter, ids, n_samples=2)  # fisher is the default
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    lins = list(quantized_linears(model, adapter))
    assert set(sens) == set(lins)
    for name in (lins[0], lins[len(lins) // 2], lins[-1]):  # first, middle, last block
        assert sens[name] == pytest.approx(_fisher_brute_force(model, name, ids[:2]), rel=1e-4)
    # fisher is not the energy proxy under another name: the two rank layers differently
    energy = layer_sensitivity(model, adapter, ids, n_samples=2, proxy="energy")
    ratio = [sens[n] / energy[n] for n in lins]
    assert max(ratio) / min(ratio) > 2


def test_sensitivity_without_data_is_weight_energy_and_a_bad_proxy_is_refused():
    model = tiny_llama()
    adapter = get_adapter(model.config)
    sens = layer_sensitivity(model, adapter, None)
    for name, lin in quantized_linears(model, adapter).items():
        assert sens[name] == pytest.approx(float(lin.weight.detach().square().sum()))
    with pytest.raises(ValueError, match="unknown sensitivity proxy 'hessian'"):
        layer_sensitivity(model, adapter, torch.zeros(1, 4, dtype=torch.long), proxy="hessian")


def test_cpu_mix_candidates_have_cheap_search():
    cands = mix_candidates(device="cpu")
    assert "9to3" in [c.name for c in cands] and "24to8" not in [c.name for c in cands]
    rates = [c.bits_per_weight for c in cands]
    assert rates == sorted(set(rates))
    assert [c.name for c in mix_candidates(device="cpu", names="12to6,9to3")] == ["12to6", "9to3"]
