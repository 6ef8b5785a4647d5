"""Measure each shipped lattice's Gaussian MSE with its standard error, and record them.

    python scripts/measure_lattices.py --device cuda --fresh_seed 4321 --out /tmp/m.json
    python scripts/measure_lattices.py --device cuda --fresh_seed 4321 --write   # into index.json

For every lattice in ``lattice/index.json`` this re-runs the recorded measurement (the row's
``search`` and ``bases``, ``n_eval`` vectors of the stream that ``lattice.gaussian_mse`` draws
from its default seed, which is what ``lattice_generator.py`` used) and keeps the per-vector
squared errors ``e_i = ||z_i - M y_i||^2 / d``: the MSE is their mean and its standard error
``std(e) / sqrt(n)``. ``--fresh_seed`` adds an independent measurement on another stream (the
real check of a claim: a different sample), and ``--check_n`` records the exact MSE of the first
k vectors of the recorded stream, which CI re-computes on CPU (tests/test_lattice_claims.py).

``--write`` stores per row: ``eval_seed``, ``mse_se`` (SE of the recorded ``mse``),
``check`` {n, seed, mse} (n from :func:`check_size`, a few seconds of CPU search) and, with
``--fresh_seed``, ``recheck`` {seed, n, mse, se, device, date}. It never changes ``mse``
itself; a reproduction further than 1e-3 relative from it is reported and not written (an
index row that does not describe its matrix). ``--results`` writes from an earlier ``--out``
file instead of measuring (measure on a GPU, record from anywhere).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from liftquant.core import lattice as L

# The stream gaussian_mse (and so lattice_generator.py) measures on when given no seed.
EVAL_SEED = inspect.signature(L.gaussian_mse).parameters["seed"].default
EVAL_BATCH = inspect.signature(L.gaussian_mse).parameters["batch"].default
REPRODUCE_RTOL = 1e-3
# Prefix lengths measured; the recorded check uses the largest one check_size allows.
CHECK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# pinv candidate elements (candidates x D) the CI check may spend per lattice: 2^28 keeps
# it to seconds of single-threaded CPU search on the 2-core CI machine for every shipped pinv
# lattice.
CHECK_BUDGET = 1 << 28


def check_size(row: dict) -> int:
    """Vectors in a lattice's CI reproduction check: all of CHECK_SIZES' largest for exhaustive
    search (one matmul per batch), else the largest within CHECK_BUDGET (at least the smallest)."""
    if row["search"] != "pinv":
        return CHECK_SIZES[-1]
    per_vector = (row["bases"] or L.SEARCH_BASES) * (1 << (row["D"] - row["d"])) * row["D"]
    fits = [k for k in CHECK_SIZES if k * per_vector <= CHECK_BUDGET]
    return fits[-1] if fits else CHECK_SIZES[0]


def per_vector_errors(M: torch.Tensor, *, n: int, seed: int, method: str, bases: int | None,
                      device: str = "cpu", batch: int = EVAL_BATCH,
                      kernel: str = "auto") -> torch.Tensor:
    """``e_i = ||z_i - M y_i||^2 / d`` (float64, shape (n,)) for the first ``n`` vectors of the
    stream ``lattice.gaussian_mse(M, n=..., seed=seed, batch=batch)`` draws, encoded with the
    same search: ``e.mean()`` is that function's value (up to float32 summation order)."""
    dev = torch.device(device)
    Md = M.to(dev).float()
    d, D = Md.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    off = L.padding_offsets(Md, bases=bases or L.search_bases(D, d)) if method == "pinv" else None
    out = []
    for start in range(0, n, batch):
        z = torch.randn(min(batch, n - start), d, generator=gen).to(dev)
        codes = L.encode(z, Md, method=method, offsets=off, kernel=kernel)
        out.append((z - L.decode(codes, Md)).square().sum(-1).double().cpu() / d)
    return torch.cat(out)


def mean_se(e: torch.Tensor) -> tuple[float, float]:
    return float(e.mean()), float(e.std(unbiased=True)) / math.sqrt(e.numel())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--names", nargs="*", default=None, help="default: every index row")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=None, help="default: the row's n_eval")
    p.add_argument("--fresh_seed", type=int, default=None)
    p.add_argument("--check_n", type=int, nargs="*", default=list(CHECK_SIZES),
                   help="prefix lengths whose exact MSE is reported")
    p.add_argument("--index", type=Path, default=ROOT / "lattice" / "index.json")
    p.add_argument("--out", type=Path, default=None, help="JSON with every number measured")
    p.add_argument("--write", action="store_true", help="record the results in the index")
    p.add_argument("--results", type=Path, default=None,
                   help="an earlier --out file: record it instead of measuring")
    args = p.parse_args(argv)

    rows = json.loads(args.index.read_text())
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else "cpu")
    results = {}
    date = _dt.date.today().isoformat()
    if args.results:
        saved = json.loads(args.results.read_text())
        device_name, results = saved["device"], saved["results"]
        date = saved.get("date", date)
        results = {k: {**v, "prefix": {int(n): m for n, m in v["prefix"].items()}}
                   for k, v in results.items() if not args.names or k in args.names}
    for r in rows:
        if args.results or (args.names and r["name"] not in args.names):
            continue
        M = L.load_projection(r["name"], args.index.parent)
        n = args.n or r["n_eval"]
        t0 = time.time()
        e = per_vector_errors(M, n=n, seed=EVAL_SEED, method=r["search"], bases=r["bases"],
                              device=args.device)
        mse, se = mean_se(e)
        res = {"recorded": r["mse"], "n": n, "seed": EVAL_SEED, "mse": mse, "se": se,
               "cv": float(e.std()) / mse, "seconds": round(time.time() - t0, 1),
               "prefix": {k: float(e[:k].mean()) for k in args.check_n if k <= n}}
        if args.fresh_seed is not None:
            t0 = time.time()
            f = per_vector_errors(M, n=n, seed=args.fresh_seed, method=r["search"],
                                  bases=r["bases"], device=args.device)
            fm, fs = mean_se(f)
            res["fresh"] = {"seed": args.fresh_seed, "n": n, "mse": fm, "se": fs,
                            "seconds": round(time.time() - t0, 1)}
        results[r["name"]] = res
        fresh = res.get("fresh")
        print(f"{r['name']:>7} {r['search']:>10} bases {r['bases']}: recorded {r['mse']:.6f} "
              f"reproduced {mse:.6f} +- {se:.6f} (cv {res['cv']:.3f}, {res['seconds']}s)"
              + (f"; fresh seed {fresh['seed']}: {fresh['mse']:.6f} +- {fresh['se']:.6f}"
                 if fresh else ""), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": device_name, "date": date,
                                        "results": results}, indent=1))
    if args.write:
        bad = []
        for r in rows:
            res = results.get(r["name"])
            if res is None:
                continue
            if abs(res["mse"] - r["mse"]) > REPRODUCE_RTOL * r["mse"] or res["n"] != r["n_eval"]:
                bad.append(r["name"])
                continue
            k = check_size(r)
            r.update(eval_seed=EVAL_SEED, mse_se=round(res["se"], 7),
                     check={"n": k, "seed": EVAL_SEED, "mse": round(res["prefix"][k], 7)})
            if "fresh" in res:
                f = res["fresh"]
                r["recheck"] = {"seed": f["seed"], "n": f["n"], "mse": round(f["mse"], 6),
                                "se": round(f["se"], 7), "device": device_name,
                                "date": date}
        args.index.write_text(json.dumps(rows, indent=1) + "\n")
        if bad:
            print(f"not written (reproduction off the recorded mse): {bad}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
