"""RTN and GPTQ baselines: grid bounds, GPTQ beats RTN, act-order/groups, exact bits, save/load."""

from __future__ import annotations

import pytest
import torch

from liftquant.cli.config import LatticeArgs, RunConfig
from liftquant.io.checkpoint import bits_report, save_quantized
from liftquant.models import get_adapter, tiny_llama
from liftquant.quantize import baselines as B

torch.set_num_threads(1)


def _correlated_layer(n=1024, d_in=64, d_out=32, rank=6, seed=0):
    """Inputs that live near a low-rank subspace with per-channel scales (strong correlation)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, d_in)[torch.randperm(d_in, generator=g)]
    X = (torch.randn(n, rank, generator=g) @ torch.randn(rank, d_in, generator=g)
         + 0.05 * torch.randn(n, d_in, generator=g)) * scales
    W = torch.randn(d_out, d_in, generator=g)
    return X, W, X.T @ X / n


def _out_err(X, W, qw):
    return float((X @ (W - qw.dequantize()).T).square().mean())


@pytest.mark.parametrize("bits,group_size", [(2, 16), (3, 0), (3, 16), (4, 0)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size):
    X, W, H = _correlated_layer()
    rtn = B.rtn_quantize(W, bits=bits, group_size=group_size)
    gptq = B.gptq_quantize(W, H, bits=bits, group_size=group_size)
    assert _out_err(X, W, gptq) < 0.5 * _out_err(X, W, rtn)


def _obq_reference(W, H, *, bits, group_size, damp=0.01):
    """Textbook sequential OBS update in float64 with the explicit inverse Hessian, no lazy
    batches and no Cholesky: column q is rounded, its error spread over columns > q, and q is
    eliminated from H^-1. GPTQ is an exact reformulation of this loop."""
    W, H = W.double().clone(), H.double().clone()
    d = W.shape[1]
    Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(d, dtype=H.dtype))
    codes = torch.zeros_like(W)
    for q in range(d):
        if q % group_size == 0:
            s, z = (t.double() for t in B.minmax_params(W[:, q:q + group_size].float(), bits=bits))
        codes[:, q] = B.quantize_codes(W[:, q], s, z, bits=bits)
        err = (W[:, q] - s * (codes[:, q] - z)) / Hinv[q, q]
        W[:, q:] -= err[:, None] * Hinv[q, q:][None, :]
        Hinv = Hinv - Hinv[:, q:q + 1] @ Hinv[q:q + 1, :] / Hinv[q, q]
    return codes


@pytest.mark.parametrize("group_size", [0, 8])
def test_gptq_equals_sequential_obs_reference(group_size):
    _, W, H = _correlated_layer(n=512, d_in=40, d_out=6, seed=7)
    ref = _obq_reference(W, H, bits=3, group_size=group_size or 40)
    # block_size 16 puts lazy-batch edges inside groups and between them
    ours = B.gptq_quantize(W, H, bits=3, group_size=group_size, block_size=16)
    assert torch.equal(ours.codes.double(), ref)


def test_gptq_with_identity_hessian_is_rtn():
    """No input correlation -> no error to spread: GPTQ must reduce to round-to-nearest."""
    W = torch.randn(16, 48, generator=torch.Generator().manual_seed(1))
    for gs in (0, 16):
        g = B.gptq_quantize(W, torch.eye(48), bits=3, group_size=gs)
        r = B.rtn_quantize(W, bits=3, group_size=gs)
        assert torch.equal(g.codes, r.codes) and torch.equal(g.scales, r.scales)
        assert torch.equal(g.zeros, r.zeros)


def test_rtn_per_channel_4bit_round_trip_bounds():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(24, 96, generator=g)
    W[3, 7] = 12.0  # an outlier only widens its own row's grid
    qw = B.rtn_quantize(W, bits=4, group_size=0)
    assert qw.scales.shape == (24, 1) and qw.scales.dtype == torch.float16
    assert int(qw.codes.max()) <= 15 and qw.codes.dtype == torch.uint8
    err = (W - qw.dequantize()).abs()
    step = qw.scales.float()  # (24, 1)
    assert bool((err <= 0.5 * step * (1 + 1e-3) + 1e-7).all())
    assert float(err[0].max()) < float(err[3].max())
    # away from the outlier row the rounding error behaves like uniform noise: MSE ~ step^2/12
    rows = torch.arange(24) != 3
    mse = float((W - qw.dequantize())[rows].square().mean())
    assert 0.8 < mse / float((step[rows] ** 2 / 12).mean()) < 1.2
    # groups only ever shrink the per-element grid step
    grouped = B.rtn_quantize(W, bits=4, group_size=32)
    assert float((W - grouped.dequantize()).square().sum()) < float(err.square().sum())


def test_act_order_and_group_size_paths_run_and_differ():
    X, W, H = _correlated_layer(seed=3)
    variants = {(a, gs): B.gptq_quantize(W, H, bits=3, group_size=gs, act_order=a)
                for a in (False, True) for gs in (0, 16)}
    deq = {k: v.dequantize() for k, v in variants.items()}
    keys = list(deq)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not torch.equal(deq[a], deq[b]), (a, b)
    act_group = variants[(True, 16)]
    assert act_group.g_idx is not None and variants[(False, 16)].g_idx is None
    assert torch.bincount(act_group.g_idx.long()).tolist() == [16] * 4  # groups of 16 columns
    rtn = _out_err(X, W, B.rtn_quantize(W, bits=3, group_size=16))
    for v in variants.values():
        assert _out_err(X, W, v) < rtn


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packed_state_round_trip_and_exact_bits(bits):
    _, W, H = _correlated_layer(d_in=37, d_out=5, seed=4)  # odd sizes: padding of both packings
    qw = B.gptq_quantize(W, H, bits=bits, group_size=16, act_order=True)
    state = qw.state("layer")
    assert state["layer.qweight"].shape == (bits, 5, 5)  # ceil(37 / 8) bytes per plane row
    back = B.QuantizedWeight.from_state(dict(state), "layer", in_features=37, bits=bits,
                                        group_size=16)
    assert torch.equal(back.dequantize(), qw.dequantize())
    n_groups = 3
    assert qw.storage_bits(bias_bits=80) == {
        "code_bits": 5 * 37 * bits, "weights": 5 * 37,
        "side_bits": 5 * n_groups * (16 + bits) + 37 * 32 + 80}


def test_config_validation():
    cfg = RunConfig(lattice=LatticeArgs(method="gptq", baseline_bits=3, group_size=0))
    assert cfg.lattice.method == "gptq"
    with pytest.raises(ValueError, match="baseline_bits"):
        RunConfig(lattice=LatticeArgs(method="rtn", bits=2.5))
    with pytest.raises(ValueError, match="method"):
        RunConfig(lattice=LatticeArgs(method="awq"))
    with pytest.raises(ValueError):
        B.BaselineSpec(method="gptq", bits=1)
    assert B.BaselineSpec(bits=3, group_size=0, act_order=True).name == "gptq-w3pc-act"


@pytest.mark.parametrize("spec", [B.BaselineSpec("gptq", bits=3, group_size=32, act_order=True),
                                  B.BaselineSpec("rtn", bits=2, group_size=0)])
def test_save_load_identical_logits(spec, tmp_path):
    model = tiny_llama(seed=0)
    adapter = get_adapter(model.config)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fp_logits = model(ids).logits
    weights, rows = B.quantize_baseline(model, ids, spec=spec, adapter=adapter,
                                        device=torch.device("cpu"), batch_size=2)
    assert len(weights) == 7 * 2 and len(rows) == 2 and "model.layers.1.mlp.down_proj" in weights
    bits = bits_report(model, quantized=B.storage_bits(model, weights))
    q = bits["quantized_linears"]
    assert q["bpw_codes"] == spec.bits and q["bpw_total"] > spec.bits
    assert bits["lm_head_bits"] > 0 and bits["total_bytes"] < sum(
        p.numel() * 4 for p in model.parameters())
    qc = B.quantization_config(spec, quantized_modules=list(weights), not_converted=["lm_head"])
    save_quantized(model, None, tmp_path, qconfig=qc, tensors=B.checkpoint_tensors(model, weights))
    loaded, tok = B.load_checkpoint(tmp_path)
    assert tok is None
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(loaded(ids).logits, logits)
    assert not torch.equal(logits, fp_logits)
    assert loaded.liftquant_quantization_config["name"] == spec.name


def test_gptq_model_closer_to_fp_than_rtn():
    """On the tiny model, GPTQ's block-wise error feedback lowers the logit error vs RTN."""
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(6))
    errs = {}
    for method in ("rtn", "gptq"):
        model = tiny_llama(seed=0)
        with torch.no_grad():
            ref = model(ids).logits
        B.quantize_baseline(model, ids, spec=B.BaselineSpec(method, bits=2, group_size=0),
                            adapter=get_adapter(model.config), device=torch.device("cpu"),
                            batch_size=4)
        with torch.no_grad():
            errs[method] = float((model(ids).logits - ref).square().mean())
    assert errs["gptq"] < errs["rtn"]


def test_pipeline_hessian_is_the_weighted_gram_of_the_linear_inputs():
    """The Hessian the block loop hands to GPTQ is sum_t c_t x_t x_t^T / n of the inputs the
    group's first linear really sees (c = first_token_weight at position 0, 1 elsewhere)."""
    from liftquant.quantize.cache import ActivationCache
    from liftquant.quantize.capture import capture_block_inputs

    model = tiny_llama(seed=0)
    adapter = get_adapter(model.config)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(7))
    X = ActivationCache(4, 16, model.config.hidden_size, mode="cpu", dtype=torch.float32)
    kwargs = capture_block_inputs(model, adapter, ids, cache=X, batch_size=2, device="cpu")
    block = adapter.get_blocks(model)[0]
    seen = []
    lin = adapter.get_linear(block, "mlp.gate_proj")
    handle = lin.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    x = seen[0]  # (4, 16, hidden): the true inputs of gate_proj in block 0
    for w in (1.0, 64.0):
        c = torch.ones(16)
        c[0] = w
        ref = torch.einsum("bti,t,btj->ij", x, c, x) / x[..., 0].numel()
        H = B._group_hessian(block, lin, X, kwargs, batch_size=3, device=torch.device("cpu"),
                             first_token_weight=w)
        assert torch.allclose(H, ref, rtol=1e-4, atol=1e-6)


def test_first_token_weight_is_used_and_recorded():
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(8))
    out = {}
    for w in (1.0, B.FIRST_TOKEN_WEIGHT):
        model = tiny_llama(seed=0)
        spec = B.BaselineSpec("gptq", bits=3, group_size=32, first_token_weight=w)
        weights, _ = B.quantize_baseline(model, ids, spec=spec, adapter=get_adapter(model.config),
                                         device=torch.device("cpu"), batch_size=2)
        out[w] = weights["model.layers.1.self_attn.k_proj"].dequantize()
        qc = B.quantization_config(spec, quantized_modules=list(weights), not_converted=[])
        assert qc["first_token_weight"] == w
    assert not torch.equal(out[1.0], out[B.FIRST_TOKEN_WEIGHT])
    assert B.BaselineSpec("gptq", first_token_weight=1).name == "gptq-w4g128-ftw1"
    assert B.BaselineSpec("gptq").name == "gptq-w4g128"
    with pytest.raises(ValueError, match="first_token_weight"):
        B.BaselineSpec("gptq", first_token_weight=0)


def test_bench_external_grid_check_and_bits_match_our_accounting():
    """scripts/bench_external.py (external peers): the <= 2^b values-per-group check accepts an
    RTN-quantized model, rejects the FP one, and counts bits exactly as our baselines do."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_external.py"
    spec_ = importlib.util.spec_from_file_location("bench_external", path)
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    model = tiny_llama(seed=0)
    adapter = get_adapter(model.config)
    with pytest.raises(RuntimeError, match="not quantized"):
        bench.check_grid(model, adapter, bits=3, group_size=48)
    weights, _ = B.quantize_baseline(model, None, spec=B.BaselineSpec("rtn", bits=3, group_size=48),
                                     adapter=adapter, device=torch.device("cpu"))
    assert bench.check_grid(model, adapter, bits=3, group_size=48) == B.storage_bits(model, weights)
