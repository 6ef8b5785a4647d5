"""Launch-parameter sweep of the fused transform T* on the GPU (per-call us in a CUDA graph).

For decode-sized inputs the transform is latency bound: a handful of programs, tiny dots.
This times tile rows, column chunk, warps, pair-layout vs plain output and stacked members
over rotating side tensors (HBM, not L2), next to a trivial Triton kernel as the floor.
    python scripts/sweep_transform.py --json bench/kernels/transform_sweep.json
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from bench_kernels import graph_bench, random_packed_layer

from liftquant.kernels import triton_int1 as ti
from liftquant.util.provenance import RECORD_KEY, record_fields
from liftquant.util.records import merge_json_rows

KEY = ("n", "members", "tile_rows", "chunk", "warps", "pairs", *RECORD_KEY)


@triton.jit
def _floor_kernel(X, OUT, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(OUT + i, tl.load(X + i, mask=i < n, other=0.0) * 2.0, mask=i < n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    ap.add_argument("--ins", default="4096,14336,576")
    ap.add_argument("--lattice", default="20to8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dt = torch.bfloat16
    prov = record_fields(device="cuda")
    res = {"rows": []}
    x = torch.randn(1, 4096, device="cuda", dtype=dt)
    y = torch.empty_like(x)
    floor = graph_bench(lambda a, b: _floor_kernel[(1,)](a, b, 4096, BLOCK=4096), [(x, y)])
    print(f"floor kernel {floor:.2f} us", flush=True)
    for n in map(int, args.ins.split(",")):
        for M in (1, 3):
            layers = [[random_packed_layer(n, 64, args.lattice, seed=10 * c + m) for m in range(M)]
                      for c in range(24)]
            stacks = [tuple(torch.stack([getattr(ly, a) for ly in g]) if M > 1 else
                            getattr(g[0], a) for a in ("s1", "L", "R", "s2_act"))
                      for g in layers]
            d, D = layers[0][0].spec.target_dim, layers[0][0].spec.lifted_dim
            C = layers[0][0].R.shape[1]
            xs = [torch.randn(1, n, device="cuda", dtype=dt) for _ in stacks]
            for br in (16, 32):
                if (br * C) % 32 or br > 2 * ti._pow2(layers[0][0].block_shape[0]):
                    continue
                for cc in (64, 128):
                    for nw in (4, 8):
                        for pairs in (True, False):
                            if not pairs and (br, cc) != (16, 64):
                                continue
                            try:
                                t = graph_bench(lambda a, s, br=br, cc=cc, nw=nw, p=pairs, d=d, D=D:
                                                ti.launch_transform(a, *s, d=d, D=D, pairs=p,
                                                                    tile_rows=br, chunk=cc,
                                                                    num_warps=nw),
                                                list(zip(xs, stacks)))
                            except Exception as err:  # noqa: BLE001 - out of resources etc.
                                print(n, M, br, cc, nw, pairs, "failed", str(err)[:80])
                                continue
                            row = {"n": n, "members": M, "block": list(layers[0][0].block_shape),
                                   "C": C, "tile_rows": br, "chunk": cc, "warps": nw,
                                   "pairs": pairs, "us": round(t, 2)}
                            res["rows"].append(row)
                            print(row, flush=True)
            if args.json:  # a list of rows; rows of other commits and GPUs are kept
                merge_json_rows(args.json, [{**r, "floor_us": floor, **prov} for r in res["rows"]],
                                KEY)
    best = {}
    for r in res["rows"]:
        k = (r["n"], r["members"], r["pairs"])
        if k not in best or r["us"] < best[k]["us"]:
            best[k] = r
    print("\nbest per (n, members, pairs):")
    for k, r in sorted(best.items()):
        print(k, r["tile_rows"], r["chunk"], r["warps"], r["us"])


if __name__ == "__main__":
    main()
