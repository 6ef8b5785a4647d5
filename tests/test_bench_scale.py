"""scripts/bench_scale.py: random-weight models of every benchmarked family, and its rows."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
try:
    import bench_scale
finally:
    sys.path.remove(str(ROOT / "scripts"))


@pytest.mark.parametrize("shape", ["llama-tiny", "qwen3.5-tiny", "qwen3-moe-tiny"])
def test_random_models_have_the_shape_asked_for(shape):
    full, total = bench_scale.build_model(shape, None)
    assert total == full.config.num_hidden_layers == bench_scale.SHAPES[shape][1][
        "num_hidden_layers"]
    part, total2 = bench_scale.build_model(shape, 1)
    assert total2 == total and part.config.num_hidden_layers == 1
    capped, _ = bench_scale.build_model(shape, total + 5)  # more blocks than the shape has
    assert capped.config.num_hidden_layers == total
    if getattr(full.config, "layer_types", None):
        assert part.config.layer_types == full.config.layer_types[:1]
        assert {"linear_attention", "full_attention"} <= set(full.config.layer_types)
    for name, p in full.named_parameters():
        assert torch.isfinite(p).all(), name
        if p.ndim >= 2 and p.numel() > 1000:
            assert abs(p.float().std().item() - bench_scale.WEIGHT_STD) < 0.002, name
    with torch.no_grad():
        logits = full(torch.arange(12).view(1, 12)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_hybrid_shape_row_is_projected_from_the_blocks_run(tmp_path):
    out = tmp_path / "scale.csv"
    assert bench_scale.main(["--shape", "qwen3.5-tiny", "--blocks", "2", "--expc", "12to6",
                             "--nsamples", "8", "--seqlen", "32", "--out", str(out)]) == 0
    (row,) = list(csv.DictReader(out.open()))
    assert (row["shape"], row["blocks_run"], row["blocks_total"], row["projected"]) == (
        "qwen3.5-tiny", "2", "4", "1")
    assert float(row["total_seconds"]) > float(row["seconds_per_block"]) > 0


@pytest.mark.slow
def test_stage1_profile_row_has_every_timing_and_exact_rotations(tmp_path):
    import json

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import profile_stage1
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    out = tmp_path / "p.json"
    assert profile_stage1.main(["--shape", "llama-tiny", "--seqlen", "32", "--repeats", "1",
                                "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    for key in ("dense_step", "proxy_weights", "proxy_weights_fwd_bwd", "step",
                "rotate_broadcast", "rotate_two_gemm", "rotate_einsum"):
        assert row[key] > 0, key
    for key in ("rotate_broadcast_max_err", "rotate_two_gemm_max_err", "rotate_einsum_max_err"):
        assert row[key] < 1e-5, key  # every formulation is the same rotation
    assert row["weights_per_block"] == 2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64  # q,o k,v mlp
