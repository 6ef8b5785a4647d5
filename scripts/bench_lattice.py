"""Benchmark nearest-code search per 10^6 Gaussian weights (writes bench/lattice/lattice.csv).

Methods measured in one run, same lattices and inputs:
  * ``pinv_torch_baseline``: a straightforward batched torch version of the published heuristic
    (materialises the (B, 2^(D-d), D) candidate tensor in chunks), no refinement;
  * ``pinv_triton_flip``: the fused Triton kernel (lattice.encode on CUDA) + greedy bit flips,
    same single null-space basis as the baseline;
  * ``pinv<b>b_triton_flip``: the quantizer's search: union of ``lattice.search_bases`` null-space
    bases (4 by default; the lattice index may ask for more) + flips;
  * ``pinv<b>b_triton_unpaired_flip``: the same with the one-padding-per-row kernel
    (``search_pinv_triton(paired=False)``), the A/B for the paired kernel;
  * ``exhaustive_torch``: exact search as one matmul per code chunk, where 2^D is small.

Usage: python scripts/bench_lattice.py --lattices 16to8,20to8,24to8,24to10,30to14,32to16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from liftquant.core import lattice as L
from liftquant.util.provenance import RECORD_KEY, record_fields
from liftquant.util.records import merge_csv_rows

COLUMNS = ["lattice", "method", "device", "seconds_per_1M", "mse", "commit"]
KEY = ("lattice", "method", "device", *RECORD_KEY)  # rows of other commits/GPUs are kept
BASELINE_CHUNK_ELEMENTS = 1 << 28  # give the torch baseline large (1 GiB fp32) chunks on GPU


def _time(fn, *, repeats: int, device: torch.device) -> tuple[float, object]:
    out = fn()  # warm-up (Triton autotune / compile)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_one(name: str, *, n_weights: int, device: torch.device, repeats: int) -> list[dict]:
    M = L.load_projection(name).to(device)
    d, D = M.shape
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n_weights // d, d, generator=gen).to(device)
    scale = 1e6 / (z.shape[0] * d)
    off = L.padding_offsets(M)  # one basis: the published heuristic
    rows = []

    def record(method: str, fn) -> None:
        seconds, codes = _time(fn, repeats=repeats, device=device)
        mse = float((z - L.decode(codes, M)).square().mean())
        rows.append({"lattice": name, "method": method, "device": _device_name(device),
                     "seconds_per_1M": round(seconds * scale, 5), "mse": round(mse, 6)})
        print(f"{name:8s} {method:22s} {seconds * scale:9.4f} s/1M  mse {mse:.5f}", flush=True)

    old = L.MAX_CHUNK_ELEMENTS
    L.MAX_CHUNK_ELEMENTS = BASELINE_CHUNK_ELEMENTS if device.type == "cuda" else old
    try:
        record("pinv_torch_baseline", lambda: L._search_pinv(z, M, off)[0])
    finally:
        L.MAX_CHUNK_ELEMENTS = old
    if device.type == "cuda":
        record("pinv_triton_flip", lambda: L.encode(z, M, method="pinv", offsets=off))
        record("pinv_triton_noflip",
               lambda: L.encode(z, M, method="pinv", offsets=off, refine=False))
        nb = L.search_bases(D, d)
        offb = L.padding_offsets(M, bases=nb)
        record(f"pinv{nb}b_triton_flip", lambda: L.encode(z, M, method="pinv", offsets=offb))
        from liftquant.kernels.search import search_pinv_triton

        # A/B: the one-padding-per-row kernel the paired one replaced, same bases and flips
        record(f"pinv{nb}b_triton_unpaired_flip", lambda: L.refine_flips(
            z, search_pinv_triton(z, M, offb, paired=False)[0], M))
    else:
        record("pinv_torch_flip", lambda: L.encode(z, M, method="pinv", offsets=off))
    if D <= 20:
        record("exhaustive_torch", lambda: L.encode(z, M, method="exhaustive", kernel="torch"))
        if device.type == "cuda":
            record("exhaustive_triton", lambda: L.encode(z, M, method="exhaustive"))
    return rows


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--lattices", default="16to8,20to8,24to8,24to10,30to14,32to16")
    p.add_argument("--n_weights", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", type=Path, default=Path("bench/lattice/lattice.csv"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    prov = record_fields(device=device)  # commit, dirty, source hash, gpu, date, torch
    rows = []
    names = [n.strip() for n in args.lattices.split(",")]
    missing = [n for n in names if not L.lattice_path(n).is_file()]
    if missing:
        print(f"skipping lattices with no file: {', '.join(missing)}")
    names = [n for n in names if n not in missing]
    for name in names:
        rows += bench_one(name, n_weights=args.n_weights, device=device,
                          repeats=args.repeats)
        # after every lattice, so a run cut short keeps its rows; other commits' rows stay
        merge_csv_rows(args.output, [{**r, **prov} for r in rows], KEY, columns=COLUMNS)
    print(f"\n{'lattice':8s} {'speedup(triton+flip vs baseline)':>34s} {'mse base':>9s} {'mse ours':>9s}")
    for name in names:
        base = next(r for r in rows if r["lattice"] == name and r["method"] == "pinv_torch_baseline")
        ours = next((r for r in rows if r["lattice"] == name and r["method"] == "pinv_triton_flip"),
                    base)
        print(f"{name:8s} {base['seconds_per_1M'] / ours['seconds_per_1M']:34.1f} "
              f"{base['mse']:9.5f} {ours['mse']:9.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
