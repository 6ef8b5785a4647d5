"""Decode GEMM for 2-16 tokens on the GPU -> bench/kernels/gemm_small.csv (+ a sweep JSON).

For each Llama-3 weight shape, lattice and batch, with random packed weights, per-call times of
back-to-back calls over rotating weight copies (> 3x L2) in one CUDA graph (as the decode step
runs them, ``bench_kernels.graph_bench``):

* ``triton-gemm-small``: the split-K tensor-core GEMM (``kernels.gemm_small``), the fastest of
  the configurations swept at the first ``--batch`` (all in the JSON; later batches re-time that
  winner) and, as ``triton-gemm-small-default``, the configuration the planner uses
  (``gemm_small.pick_config``);
* ``triton-gemm``: the byte-tile GEMM the ``gemm_fused_t`` path ran before;
* ``triton-gemv-x{B}``: the tuned batch-1 GEMV called B times (what a batched kernel must
  beat);
* ``cublas-bf16``: ``F.linear`` with the bf16 weight of the original shape.

``fraction_of_copy`` = packed-weight bytes / time over the measured copy rate (read + write).

    python scripts/bench_gemm_small.py --sweep-json bench/kernels/gemm_small_sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import ROTATE_BYTES, copy_gbps, graph_bench, random_packed_layer

from liftquant.kernels import gemm_small as gs
from liftquant.kernels import gemv_tuner, registry
from liftquant.kernels import triton_int1 as ti
from liftquant.util.provenance import RECORD_KEY, record_fields
from liftquant.util.records import merge_csv_rows, merge_json_rows

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (out, in) of Llama-3-8B
COLUMNS = ["shape", "config", "batch", "backend", "time_us", "weight_gbps", "fraction_of_copy",
           "bf16_time_us", "speedup_vs_bf16", "kernel"]
KEY = ("shape", "config", "batch", "backend", *RECORD_KEY)


def candidates(quick: bool) -> list[gs.GemmSmallConfig]:
    """The swept configurations: weights on the MMA's M side with paired sign expansion over
    tiles, warps and K splits (0: automatic), tokens on M padded to 64 rows, plus tokens-on-M
    (16 rows) and bit-by-bit references."""
    C = gs.GemmSmallConfig
    grid = itertools.product((128, 64), (256, 128), (4, 8), (0, 1, 2, 4, 8, 16))
    out = [C(block_n=bn, block_k=bk, num_warps=w, split=sp) for bn, bk, w, sp in grid]
    tok64 = [C(block_m=64, block_n=bn, block_k=bk, swap=False, split=sp)
             for bn, bk, sp in ((64, 128, 8), (128, 128, 8), (128, 64, 8), (64, 256, 8),
                                (128, 128, 0), (64, 128, 16))]
    if quick:
        out = out[:4]
    refs = [C(block_n=32, block_k=128, swap=False), C(block_n=32, block_k=128, swap=False, split=4),
            C(block_n=128, block_k=256, pairs=False)]
    return out + tok64 + refs


def bench(N: int, n: int, spec: str, batches: list[int], cands, rows: list, sweep: list,
          base: dict) -> None:
    dt = torch.bfloat16
    proto = random_packed_layer(n, N, spec)
    wbytes = proto.packed_signs.numel()
    copies = max(1, -(-ROTATE_BYTES // wbytes))
    layers = [proto] + [random_packed_layer(n, N, spec, seed=i + 1) for i in range(copies - 1)]
    K = proto.lifted_width
    w16 = [torch.randn(N, n, device="cuda", dtype=dt)
           for _ in range(max(1, -(-ROTATE_BYTES // (2 * N * n))))]
    tuner = registry.get_backend("triton", "cuda").tuner
    d, D = proto.spec.target_dim, proto.spec.lifted_dim
    best_cfg = None
    for B in batches:
        xs = [torch.randn(B, K, device="cuda", dtype=dt) / K**0.5 for _ in layers]
        args = list(zip(xs, layers))
        t16 = graph_bench(F.linear, [(torch.randn(B, n, device="cuda", dtype=dt), w)
                                     for w in w16])
        times = {}
        # every candidate at the first batch; later batches re-time its winner
        for cfg in cands if B == batches[0] else [best_cfg]:
            try:
                times[cfg.label] = graph_bench(
                    lambda x, ly, c=cfg: gs.launch_gemm_small(x, ly.packed_signs, ly.scale,
                                                              None, c), args)
            except Exception as exc:  # noqa: BLE001 - a configuration the compiler rejects
                times[cfg.label] = None
                print(f"  {cfg.label}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        ok = {k: v for k, v in times.items() if v is not None}
        best = min(ok, key=ok.get)
        if B == batches[0]:
            best_cfg = next(c for c in cands if c.label == best)
        default = gs.pick_config(B, N, K, gs.words_aligned(proto.packed_signs))
        t_default = graph_bench(
            lambda x, ly, c=default: gs.launch_gemm_small(x, ly.packed_signs, ly.scale, None, c),
            args)
        cfg_old = ti.pick_gemm_config(B, N)
        t_old = graph_bench(lambda x, ly, c=cfg_old: ti.launch_gemm(
            x, ly.packed_signs, ly.scale, None, block_m=c.block_m, block_n=c.block_n,
            block_k=c.block_k, num_warps=c.num_warps), args)
        # the batch-1 GEMV B times (pair-layout inputs of one token each)
        x1 = [torch.randn(1, n, device="cuda", dtype=dt) for _ in layers]
        pairs = [ti.launch_transform(x, ly.s1, ly.L, ly.R, ly.s2_act, d=d, D=D, pairs=True)
                 for x, ly in zip(x1, layers)]
        t_gemv = B * graph_bench(lambda p, ly: gemv_tuner.gemv(
            p[0], p[1], ly.packed_signs, ly.scale, None, dt, tuner=tuner),
            list(zip(pairs, layers)))
        shape = f"{N}x{n}"
        old_label = f"bm{cfg_old.block_m}-bn{cfg_old.block_n}-bk{cfg_old.block_k}"
        for backend, t, label in (("triton-gemm-small", ok[best], best),
                                  ("triton-gemm-small-default", t_default, default.label),
                                  ("triton-gemm", t_old, old_label),
                                  (f"triton-gemv-x{B}", t_gemv, "tuned"),
                                  ("cublas-bf16", t16, "")):
            gbps = wbytes / t / 1e3
            rows.append({**base, "shape": shape, "config": spec, "batch": B, "backend": backend,
                         "time_us": f"{t:.2f}", "weight_gbps": f"{gbps:.1f}",
                         "fraction_of_copy": f"{gbps / base['copy_gbps']:.3f}",
                         "bf16_time_us": f"{t16:.2f}", "speedup_vs_bf16": f"{t16 / t:.2f}",
                         "kernel": label})
            print(f"{shape:>11} {spec:>6} b{B:<2} {backend:>26} {t:9.2f} us "
                  f"frac {gbps / base['copy_gbps']:.3f} x{t16 / t:.2f} {label}", flush=True)
        sweep.append({"name": f"{shape}/{spec}/b{B}", "best": best, "times_us": times, **base})
    del layers, w16
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    ap.add_argument("--out", default="bench/kernels/gemm_small.csv")
    ap.add_argument("--sweep-json", default=None)
    ap.add_argument("--lattices", default="20to8,24to10")
    ap.add_argument("--batch", default="4,16", help="comma-separated token counts (2-16)")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,1024x4096 (out x in)")
    ap.add_argument("--quick", action="store_true", help="a few configurations only")
    ap.add_argument("--only", default=None, help="comma-separated configuration labels to time")
    args = ap.parse_args()
    torch.manual_seed(0)
    batches = [int(b) for b in args.batch.split(",")]
    bad = [b for b in batches if not 1 <= b <= gs.MAX_TOKENS]
    if bad:
        raise SystemExit(f"--batch {bad}: gemm_small takes 1..{gs.MAX_TOKENS} tokens")
    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split("x")))
                                             for s in args.shapes.split(",")]
    base = {**record_fields(device="cuda"), "copy_gbps": round(copy_gbps(), 1)}
    print(f"{base['gpu']}: copy {base['copy_gbps']} GB/s", flush=True)
    cands = candidates(args.quick)
    if args.only:
        wanted = set(args.only.split(","))
        cands = [c for c in cands if c.label in wanted]
        if not cands:
            raise SystemExit(f"--only {args.only}: no such configuration")
    rows, sweep = [], []
    for (N, n), spec in itertools.product(shapes, args.lattices.split(",")):
        bench(N, n, spec, batches, cands, rows, sweep, base)
        merge_csv_rows(args.out, rows, KEY, columns=COLUMNS)
        if args.sweep_json:
            merge_json_rows(args.sweep_json, sweep, ("name", *RECORD_KEY))


if __name__ == "__main__":
    main()
