"""Train (or evaluate) a LiftQuant lattice matrix M and register it in ``lattice/index.json``.

Examples::

    python lattice_generator.py --expc 24to10 --device cuda
    python lattice_generator.py --D 16 --d 8 --steps 3000 --restarts 4
    python lattice_generator.py --eval lattice/24to10.pt          # measure an existing lattice
    python lattice_generator.py --expc 32to16 --init lattice/32to16.pt --steps 0 --lloyd 6 \
        --keep_better --device cuda                               # Lloyd-polish a shipped one
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch

from liftquant.core.lattice import (
    LATTICE_DIR,
    SEARCH_BASES,
    LatticeSpec,
    gaussian_mse,
    rate_distortion_bound,
    search_bases,
)
from liftquant.core.lattice_train import (
    DEFAULT_BATCH,
    DEFAULT_CANDIDATE_BUDGET,
    DEFAULT_LR,
    DEFAULT_LR_FINAL_RATIO,
    DEFAULT_STEPS,
    DEFAULT_TAU,
    TrainResult,
    lloyd_refine,
    train_projection,
)
from liftquant.util.fileio import atomic_write
from liftquant.util.log import get_logger, seed_everything, setup_logging

logger = get_logger("lattice_generator")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--lattice", "--expc", dest="expc", help="lattice name '<D>to<d>', e.g. 24to10")
    p.add_argument("--D", type=int, help="lifted dim (sign bits per sub-vector)")
    p.add_argument("--d", type=int, help="target dim (weights per sub-vector)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--lr_final_ratio", type=float, default=DEFAULT_LR_FINAL_RATIO)
    p.add_argument("--tau", type=float, default=DEFAULT_TAU, help="soft-min temperature")
    p.add_argument("--tau_final", type=lambda t: [float(x) for x in t.split(",")], default=None,
                   help="anneal tau to this value; a comma list cycles over restarts")
    p.add_argument("--budget", type=int, default=DEFAULT_CANDIDATE_BUDGET,
                   help="max elements of the per-step candidate tensor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--method", default="auto", choices=["auto", "exhaustive", "pinv"],
                   help="search used to select restarts and to measure the final MSE")
    p.add_argument("--bases", type=int, default=None,
                   help="null-space bases of the pinv search (default: the index's entry for this "
                        f"lattice, else {SEARCH_BASES}); recorded in the index with the MSE")
    p.add_argument("--n_eval", type=int, default=100_000, help="fresh Gaussian vectors for MSE")
    p.add_argument("--output", type=Path, default=None, help="default: lattice/<D>to<d>.pt")
    p.add_argument("--index", type=Path, default=None, help="default: <output dir>/index.json")
    p.add_argument("--init", type=Path, default=None, help="start restart 0 from this matrix")
    p.add_argument("--lloyd", type=int, default=0, metavar="K",
                   help="then K Lloyd iterations (search codes, least-squares M); "
                        "with --steps 0 and --init they start from that matrix")
    p.add_argument("--lloyd_n", type=int, default=200_000,
                   help="fresh Gaussian vectors per Lloyd iteration (--time_limit also "
                        "stops starting new iterations)")
    p.add_argument("--keep_better", action="store_true",
                   help="do not overwrite an existing lattice with a higher-MSE one")
    p.add_argument("--eval", type=Path, default=None, metavar="PATH",
                   help="only measure the lattice stored at PATH")
    p.add_argument("--register", action="store_true",
                   help="with --eval: write the measured MSE (and search) into the index")
    p.add_argument("--time_limit", type=float, default=None,
                   help="seconds after which no new restart is started")
    p.add_argument("--hard_time_limit", type=float, default=None,
                   help="seconds after which a running restart is cut short")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--debug", action="store_true",
                   help="on an error show the full traceback instead of one line")
    return p


def resolve_spec(args: argparse.Namespace) -> LatticeSpec:
    if args.expc and (args.D or args.d):
        raise SystemExit("give either --expc or --D/--d, not both")
    if args.expc:
        return LatticeSpec.parse(args.expc)
    if args.eval and not (args.D or args.d):
        return LatticeSpec.parse(args.eval.stem)
    if not (args.D and args.d):
        raise SystemExit("give --expc 24to10 or both --D and --d")
    return LatticeSpec(args.D, args.d)


def read_index(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return json.loads(path.read_text())


def update_index(path: Path, entry: dict) -> None:
    rows = [r for r in read_index(path) if r.get("name") != entry["name"]]
    rows.append(entry)
    rows.sort(key=lambda r: (r["bits"], r["D"]))

    def _write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(rows, indent=1) + "\n")

    atomic_write(path, _write)


def _search_fields(method: str, bases: int) -> dict:
    return {"search": method, "bases": bases if method == "pinv" else None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    spec = resolve_spec(args)
    method = spec.default_method() if args.method == "auto" else args.method
    if args.bases is not None and args.bases < 1:
        raise SystemExit("--bases must be >= 1")
    bases = args.bases or search_bases(spec.lifted_dim, spec.target_dim)
    if args.eval:
        M = torch.load(args.eval, map_location="cpu", weights_only=True)
        if tuple(M.shape) != (spec.target_dim, spec.lifted_dim):
            raise SystemExit(f"{args.eval}: shape {tuple(M.shape)} is not (d, D) for {spec}")
        t0 = time.time()
        mse = gaussian_mse(M, n=args.n_eval, method=method, device=args.device, bases=bases)
        print(f"{spec.name}: mse {mse:.5f} ({method}, bases {bases}, n={args.n_eval}, {time.time() - t0:.1f}s) "
              f"rate-distortion bound {rate_distortion_bound(spec.bits_per_weight):.5f}")
        if args.register:
            index = args.index or (args.eval.parent / "index.json")
            row = {r["name"]: r for r in read_index(index)}.get(spec.name)
            if row is None:
                raise SystemExit(f"{spec.name} is not in {index}; train it with this script")
            update_index(index, {**row, **_search_fields(method, bases), "mse": round(mse, 6),
                                 "n_eval": args.n_eval, "eval_device": str(args.device),
                                 "eval_date": _dt.date.today().isoformat()})
        return 0
    seed_everything(args.seed)
    init = torch.load(args.init, map_location="cpu", weights_only=True) if args.init else None
    if init is not None and tuple(init.shape) != (spec.target_dim, spec.lifted_dim):
        raise SystemExit(f"--init {args.init}: shape {tuple(init.shape)} is not (d, D) for {spec}")
    if args.steps < 0 or args.lloyd < 0:
        raise SystemExit("--steps and --lloyd must be >= 0")
    if args.steps == 0 and (init is None or not args.lloyd):
        raise SystemExit("--steps 0 needs --init PATH and --lloyd K (polish an existing matrix)")
    t0 = time.time()
    if args.steps == 0:
        res = TrainResult(M=init.float(), mse=float("nan"))
    else:
        res = train_projection(
            spec, steps=args.steps, batch=args.batch, lr=args.lr,
            lr_final_ratio=args.lr_final_ratio, tau=args.tau, tau_final=args.tau_final,
            restarts=args.restarts, seed=args.seed, device=args.device, budget=args.budget,
            method=method, progress=not args.no_progress, init=init,
            time_limit=args.time_limit, hard_time_limit=args.hard_time_limit,
        )
    lloyd_scores: list[float] = []
    if args.lloyd:
        res.M, lloyd_scores = lloyd_refine(res.M, iters=args.lloyd, n=args.lloyd_n,
                                           seed=args.seed, method=method, bases=bases,
                                           device=args.device, n_select=args.n_eval,
                                           time_limit=args.time_limit)
        print(f"{spec.name}: lloyd held-out mse " + " -> ".join(f"{m:.5f}" for m in lloyd_scores))
    train_s = time.time() - t0
    mse = gaussian_mse(res.M, n=args.n_eval, method=method, device=args.device, bases=bases)
    out = args.output or (LATTICE_DIR / f"{spec.name}.pt")
    index = args.index or (out.parent / "index.json")
    old = {r["name"]: r for r in read_index(index)}.get(spec.name)
    if args.keep_better and old is not None and old["mse"] <= mse and out.is_file():
        print(f"{spec.name}: new mse {mse:.5f} not better than shipped {old['mse']:.5f}; kept")
        return 0
    atomic_write(out, lambda tmp: torch.save(res.M.contiguous().clone(), tmp))
    lloyd_fields = {"lloyd": args.lloyd, "lloyd_n": args.lloyd_n,
                    "lloyd_mse": [round(m, 6) for m in lloyd_scores]} if args.lloyd else {}
    head = {"name": spec.name, "D": spec.lifted_dim, "d": spec.target_dim,
            "bits": round(spec.bits_per_weight, 6), "mse": round(mse, 6), "n_eval": args.n_eval,
            **_search_fields(method, bases)}
    if args.steps == 0:  # a polish: keep the training provenance of the matrix it started from
        prov = old or {r["name"]: r for r in read_index(LATTICE_DIR / "index.json")}.get(spec.name)
        prov = {k: v for k, v in (prov or {}).items() if not k.startswith("eval_")}
        entry = {**prov, **head, **lloyd_fields, "init": args.init.name,
                 "lloyd_seconds": round(train_s, 1), "device": str(args.device)}
    else:
        entry = {**head, "seed": args.seed, "steps": res.steps_done,
                 "restarts": len(res.restart_mse),
                 "restart_mse": [round(m, 6) for m in res.restart_mse], "tau": args.tau,
                 "tau_final": args.tau_final or [args.tau], "lr": args.lr, "batch": args.batch,
                 "budget": args.budget, "device": str(args.device),
                 "train_seconds": round(train_s, 1), **lloyd_fields,
                 **({"init": args.init.name} if args.init else {})}
    update_index(index, {**entry, "date": _dt.date.today().isoformat()})
    runs = f"restarts {', '.join(f'{m:.5f}' for m in res.restart_mse)}; " if res.restart_mse else ""
    print(f"{spec.name}: mse {mse:.5f} ({method}, n={args.n_eval}) -> {out} [{runs}{train_s:.0f}s]")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with bad input reported as one line ``error: ...`` (exit 1)."""
    from liftquant.util import errors

    args, _ = build_parser().parse_known_args(argv)
    try:
        return main(argv)
    except errors.expected_errors() as exc:
        if args.debug:
            raise
        return errors.report(exc, errors.EXIT_REFUSED)


if __name__ == "__main__":
    sys.exit(cli())
