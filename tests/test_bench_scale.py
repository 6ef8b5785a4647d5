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


def test_project_only_fits_the_measured_rows_of_one_source(tmp_path):
    """--project_only: per-block seconds linear in nsamples through the two measured rows of
    the given source (other sources, capped runs and projections ignored), no run; refused
    with a one-line error when fewer than two sample counts were measured."""
    out = tmp_path / "scale.csv"
    base = {"shape": "llama3-8b", "lattice": "20to8", "seqlen": "2048", "max_gpu_memory": "",
            "max_host_memory": "", "flags": "", "gpus": "1",
            "blocks_total": "32", "gpu": "NVIDIA H200", "commit": "abc1234",
            "source_sha256": "a" * 16, "projected": "1", "blocks_run": "3",
            "wall_seconds": "90.0", "build_seconds": "11.0"}
    rows = [{**base, "nsamples": "128", "seconds_per_block": "16.0"},
            {**base, "nsamples": "1024", "seconds_per_block": "100.0"},
            {**base, "nsamples": "512", "seconds_per_block": "999.0", "source_sha256": "b" * 16},
            {**base, "nsamples": "256", "seconds_per_block": "5.0", "max_gpu_memory": "24.0"}]
    from liftquant.util.records import merge_csv_rows

    merge_csv_rows(out, rows, bench_scale.KEY)
    args = ["--shape", "llama3-8b", "--expc", "20to8", "--project_nsamples", "4096",
            "--project_only", "--source", "a" * 16, "--out", str(out)]
    assert bench_scale.main(args) == 0
    (proj,) = [r for r in csv.DictReader(out.open()) if r["nsamples"] == "4096"]
    per = 100.0 + (100.0 - 16.0) / (1024 - 128) * (4096 - 1024)
    assert float(proj["seconds_per_block"]) == pytest.approx(per, abs=0.01)
    assert float(proj["total_seconds"]) == pytest.approx(32 * per, abs=0.1)
    assert (proj["projected"], proj["blocks_run"], proj["wall_seconds"]) == ("1", "0", "")
    assert "128 and 1024" in proj["note"]
    with pytest.raises(SystemExit, match="two or more sample counts"):
        bench_scale.main(args[:-4] + ["--source", "b" * 16, "--out", str(out)])
