"""The benchmark scripts import on CPU, A/B kernel policies (not module switches), and build
their random-weight models on any device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_chat
    import bench_decode
    import bench_kernels
    import bench_variants

    yield bench_decode, bench_kernels, bench_variants, bench_chat
    for name in ("bench_decode", "bench_kernels", "bench_variants", "bench_chat",
                 "profile_decode"):
        sys.modules.pop(name, None)


def test_variants_are_policies(scripts):
    from liftquant.kernels.policy import PDL_MAX_GEMV_BYTES, KernelPolicy

    _, _, variants, _ = scripts
    combos = variants.variants("pdl,fused")
    assert [label for label, _ in combos] == ["pdl=1 fused=1", "pdl=1 fused=0", "pdl=0 fused=1",
                                              "pdl=0 fused=0"]
    base = KernelPolicy()
    p = variants.policy_for({"pdl": 0, "fused": 1, "pdl_big": 0}, base)
    assert (p.pdl, p.fused_small, p.pdl_max_gemv_bytes) == (False, "1", PDL_MAX_GEMV_BYTES)
    assert variants.policy_for({"prologue": 0, "early": 0}, base) == base.replace(
        fuse_prologues=False, pdl_early=False)
    with pytest.raises(ValueError, match="unknown switches"):
        variants.variants("pdl,turbo")


def test_bench_decode_model_runs_the_step_on_cpu(scripts):
    from transformers import LlamaConfig

    from liftquant.engine import StepEngine

    bench_decode = scripts[0]
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                      max_position_embeddings=32)
    model = bench_decode.build_model(cfg, "16to8", "torch", device="cpu").float()
    assert sum(type(m).__name__ == "PackedLiftLinear" for m in model.modules()) == 14
    engine = StepEngine(model, 16)
    ids = torch.randint(0, 50, (1, 5))
    logits = engine.prefill(ids)
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_bench_decode_policy_and_bytes(scripts):
    from transformers import LlamaConfig

    bench_decode = scripts[0]
    p = bench_decode.parse_policy("pdl=0,fused_small=1,pdl_max_gemv_bytes=123")
    assert (p.pdl, p.fused_small, p.pdl_max_gemv_bytes) == (False, "1", 123)
    with pytest.raises(SystemExit, match="unknown field"):
        bench_decode.parse_policy("turbo=1")
    with pytest.raises(ValueError, match="fused_small"):
        bench_decode.parse_policy("fused_small=2")
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                      tie_word_embeddings=False)
    dense = bench_decode.build_model(cfg, None, "torch", device="cpu")
    n_params = sum(t.numel() for t in dense.parameters()) - 50 * 64  # the embedding table
    assert bench_decode.weight_bytes(dense) >= 2 * n_params  # bf16, plus rotary buffers
    packed = bench_decode.build_model(cfg, "16to8", "torch", device="cpu")
    assert bench_decode.weight_bytes(packed) < bench_decode.weight_bytes(dense)


def test_bench_decode_int8_head_halves_the_head_bytes(scripts):
    from transformers import LlamaConfig

    from liftquant.kernels.int8_head import Int8Linear

    bench_decode = scripts[0]
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=500,
                      tie_word_embeddings=False)
    model = bench_decode.build_model(cfg, "16to8", "torch", device="cpu")
    before = bench_decode.weight_bytes(model)
    model = bench_decode.head8(model, 8)
    assert isinstance(model.lm_head, Int8Linear)
    assert before - bench_decode.weight_bytes(model) == 500 * 64 - 500 * 2  # bf16 -> int8 + fp16


def test_bench_chat_times_both_engines_and_merges_rows(scripts, tiny_model_dir, tmp_path):
    import csv

    bench_chat = scripts[3]
    out = tmp_path / "chat.csv"
    argv = ["--device", "cpu", "--fp_model", str(tiny_model_dir), "--lattice", "8to4",
            "--prompt", "3,5", "--tokens", "2", "--repeats", "1", "--dense", "0,1",
            "--threads", "1", "--out", str(out)]
    assert bench_chat.main(argv) == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert {(r["engine"], r["dense_cache"], r["prompt"]) for r in rows} == {
        (e, d, p) for e in ("hf", "step") for d in ("off", "on") for p in ("3", "5")}
    assert all(float(r["decode_tokens_per_s"]) > 0 and r["commit"] for r in rows)
    assert bench_chat.main(argv) == 0  # same source: rows replaced, not appended
    assert len(list(csv.DictReader(out.read_text().splitlines()))) == len(rows)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device; use --device cpu"):
            bench_chat.main(["--device", "cuda", "--out", ""])
