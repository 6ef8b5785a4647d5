"""Where a decode step spends its GPU time: kernel time by category, per step (``--batch``
sequences; batch 1 by default).

Builds random-weight models of a few real shapes (``bench_decode.build_model``), runs the same
compiled step as ``bench_decode.py``, and profiles replays of its CUDA graph with
``torch.profiler`` (CUPTI sees the kernels inside graphs). Kernels are grouped into the fused
transform T*, the int1 GEMV, cuBLAS, torch.compile's generated kernels and the rest; the
``busy`` column is the summed kernel time per token and ``step`` the wall time per token, so
``step - busy`` is the time the GPU waits between kernels.

    python scripts/profile_decode.py --shapes llama3-8b,smollm2-135m --lattices 20to8 \
        --json bench/decode/profile_decode.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from bench_decode import PROMPT, WARMUP, build_model, llama3_8b_config

from liftquant.engine.graph import GraphedDecode
from liftquant.engine.step import DecodeStep
from liftquant.util.provenance import RECORD_KEY, record_fields
from liftquant.util.records import merge_json_rows


def shape_config(name: str):
    from transformers import LlamaConfig, Qwen2Config

    if name == "llama3-8b":
        return llama3_8b_config()
    if name == "smollm2-135m":
        return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                           max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                           tie_word_embeddings=True)
    if name == "qwen2.5-0.5b":
        return Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                           max_position_embeddings=32768, rope_theta=1000000.0,
                           rms_norm_eps=1e-6, tie_word_embeddings=True)
    raise ValueError(f"unknown shape {name!r}: llama3-8b, smollm2-135m, qwen2.5-0.5b")


def category(kernel: str) -> str:
    """Kernel name -> category. Our Triton kernels are named ``_<name>_kernel``; cuBLAS's own
    GEMV kernels (``gemv2T_kernel...``, ``gemvx...``) must not count as int1 GEMVs (the runs
    recorded before this fix did count them: see bench/kernels/README.md)."""
    k = kernel.lower()
    if k.startswith("_transform_kernel"):
        return "T*"
    if k.startswith(("_splitk_kernel", "_gemv_kernel")):
        return "int1 GEMV"
    if k.startswith("_fused_small_kernel"):
        return "T* + int1 GEMV (one launch)"
    if k.startswith(("_gemm_small_kernel", "_reduce_kernel", "_gemm_kernel")):
        return "int1 GEMM (batch)"
    if "triton" in k:
        return "compiled (norm/attn/act)"
    if "gemv" in k or "gemm" in k or "cutlass" in k or "sm90" in k or "nvjet" in k:
        return "cuBLAS"
    return "other"


def profile(model, *, tokens: int, compile_mode: str | None, batch: int = 1) -> dict:
    step = DecodeStep(model, PROMPT + WARMUP + 3 * tokens + 16, compile_mode=compile_mode,
                      batch=batch)
    step.prefill(torch.randint(0, model.config.vocab_size, (batch, PROMPT), device="cuda"))
    graphed = GraphedDecode(step, warmup=WARMUP)
    graphed.tokens_per_s(tokens)
    tps = graphed.tokens_per_s(tokens)
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(tokens):
            graphed.graph.replay()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if t <= 0 or evt.key.startswith(("cudaGraph", "Memcpy", "Memset")):
            continue
        per_kernel[evt.key][0] += t
        per_kernel[evt.key][1] += evt.count
    cats: dict[str, float] = defaultdict(float)
    launches: dict[str, float] = defaultdict(float)
    for name, (t, n) in per_kernel.items():
        cats[category(name)] += t / tokens
        launches[category(name)] += n / tokens
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:15]
    return {"tokens_per_s": tps * batch, "step_us": 1e6 / tps, "busy_us": sum(cats.values()),
            "category_us": dict(cats), "launches_per_token": dict(launches),
            "top_kernels": [{"kernel": k[:120], "us_per_token": t / tokens, "calls": n / tokens}
                            for k, (t, n) in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    ap.add_argument("--shapes", default="llama3-8b,smollm2-135m")
    ap.add_argument("--lattices", default="20to8", help="'' profiles bf16 only")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--compile_mode", default="default")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    results, prov = [], record_fields(device="cuda")
    for shape in args.shapes.split(","):
        cfg = shape_config(shape)
        for lat in [None] + [x for x in args.lattices.split(",") if x]:
            torch.cuda.empty_cache()
            model = build_model(cfg, lat, args.backend if lat else "torch")
            res = profile(model, tokens=args.tokens, compile_mode=args.compile_mode,
                          batch=args.batch)
            del model
            res.update(shape=shape, config=lat or "bf16", backend=args.backend if lat else "torch",
                       tokens=args.tokens, compile_mode=args.compile_mode, batch=args.batch,
                       **prov)
            results.append(res)
            print(json.dumps(res, indent=1), flush=True)
            if args.json:  # rows of other commits and GPUs are kept
                merge_json_rows(args.json, results, ("shape", "config", "backend", "tokens",
                                                     "compile_mode", "batch", *RECORD_KEY))
    cats = sorted({c for r in results for c in r["category_us"]})
    print("\nshape config batch tok/s step_us busy_us "
          + " ".join(c.replace(" ", "_") for c in cats))
    for r in results:
        print(f"{r['shape']} {r['config']} {r['batch']} {r['tokens_per_s']:.1f} "
              f"{r['step_us']:.0f} "
              f"{r['busy_us']:.0f} " + " ".join(
                  f"{r['category_us'].get(c, 0):.0f}/{r['launches_per_token'].get(c, 0):.0f}"
                  for c in cats))


if __name__ == "__main__":
    main()
