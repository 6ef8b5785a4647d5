"""Cheaper nearest-code searches than the quantizer's 4-basis pinv search, and the MSE each gives.

The quantizer codes a sub-vector ``z`` (d) of a ``DtoD`` lattice as ``D`` signs ``y`` decoded as
``M @ y``. Its search (``lattice.encode(method="pinv")``) tries ``sign(M_pinv z + N_b^T p)`` for
all ``2^(D-d)`` paddings ``p`` and each of 4 null-space bases ``N_b`` (``padding_offsets(M,
bases=4)``: 262144 candidates per sub-vector for 24to8), keeps the closest and refines it with
greedy single-bit flips (``refine_flips``). For ``z ~ N(0, I_d)`` (``--n`` test samples,
``--seed``) this script measures, per search variant, the per-dimension MSE
``mean ||z - M y||^2 / d``, its standard error over the samples, the paired difference to the
reference ``pinv_4b`` on the same samples (with its standard error) and the candidates tried per
sub-vector (the flips not counted):

* ``pinv_4b``: today's search, the reference; ``pinv_1b``: the first basis only;
* ``*_pairflip``: the same candidates, refined by greedy single *and* pair flips instead
  (:func:`refine_pairs`);
* ``subspace_k{K}_b{B}``: paddings over the first K null-space directions of each of B bases
  only, offsets ``all_codes(K) @ N_b[:K] * sqrt(16 / K)`` (the full padding's norm), + single
  flips (``..._pairflip``: + single and pair flips);
* ``random_k{K}``: a seeded random subset of ``4 * 2^K`` of the 262144 4-basis offsets + flips;
* ``blockcd_k{K}_n{S}``: from ``sign(M_pinv z)``, S block-coordinate steps, each exhaustive over
  a random subset of K bits (one seeded subset per step, shared by all samples) with the other
  bits fixed (:func:`block_cd`), then single flips;
* ``learned_top{K}``: on ``--train_n`` separate Gaussian samples (seed ``--seed + 1``), count for
  every 4-basis offset the training samples for which it yields the best (pre-flip) code; all
  offsets giving that code count, so ties are not broken by index. Keep the K most-counted
  offsets (equal counts: lower index first), search the test samples with them, + flips. The
  row also records the distinct first-index winners on the training set and how many offsets
  are best somewhere.

Rows (one per lattice, variant, n, seed and train_n, with provenance) merge into
``bench/lattice/search_alternatives.json``; a table is printed at the end. CPU only, memory
bounded by chunking (< 4 GB). Commands::

    python scripts/search_alternatives.py --n 2048 --train_n 4096           # the recorded run
    python scripts/search_alternatives.py --n 64 --train_n 64 --out /tmp/sa.json   # smoke
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from liftquant.core.lattice import (
    LatticeSpec,
    _search_pinv,
    all_codes,
    load_projection,
    null_bases,
    null_space,
    padding_offsets,
    refine_flips,
)
from liftquant.util.provenance import RECORD_KEY, record_fields
from liftquant.util.records import merge_json_rows

REF = "pinv_4b"
REF_BASES = 4
SUBSPACE_K = (8, 10, 12)
RANDOM_K = (8, 10, 12)
BLOCKCD_K = (10, 12, 14)
BLOCKCD_STEPS = (4, 8, 12)
LEARNED_TOP = (8192, 32768, 65536)
# Bound on the elements of one (rows x candidates x D) temporary: 2^25 floats = 128 MiB fp32.
CHUNK_ELEMENTS = 1 << 25
IMPROVE_TOL = 1e-7  # as refine_flips: a move must lower the distance by more than this


# --------------------------------------------------------------------------------------------
# Search helpers
# --------------------------------------------------------------------------------------------
def per_sample_error(z: Tensor, M: Tensor, y: Tensor) -> Tensor:
    """``||z - M y||^2 / d`` per row, in float64 for the statistics."""
    return (z - y @ M.T).double().square().sum(-1) / M.shape[0]


def refine_pairs(z: Tensor, codes: Tensor, M: Tensor, *, max_iters: int | None = None) -> Tensor:
    """Greedy descent over single- and pair-bit flips: apply the best move while it improves.

    With ``r = z - M y`` and ``delta_j = 4 (y_j m_j . r + ||m_j||^2)`` (the change of
    ``||z - M y||^2`` when bit j flips), flipping bits i != j changes it by
    ``delta_i + delta_j + 8 y_i y_j (M^T M)_ij``; the diagonal holds the single flips.
    """
    y = codes.clone()
    D = M.shape[1]
    G = M.T @ M  # (D, D)
    col_sq = G.diagonal().clone()
    eye = torch.eye(D, dtype=torch.bool)
    active = torch.arange(y.shape[0])
    for _ in range(max_iters or 4 * D):
        if active.numel() == 0:
            break
        ya, za = y[active], z[active]
        r = za - ya @ M.T  # (b, d)
        delta = 4.0 * (ya * (r @ M) + col_sq)  # (b, D)
        pair = delta[:, :, None] + delta[:, None, :] + 8.0 * ya[:, :, None] * ya[:, None, :] * G
        pair = torch.where(eye, torch.diag_embed(delta), pair)  # (b, D, D)
        val, flat = pair.reshape(len(active), -1).min(dim=1)
        improve = val < -IMPROVE_TOL
        rows, flat = active[improve], flat[improve]
        i, j = flat // D, flat % D
        y[rows, i] = -y[rows, i]
        two = i != j
        y[rows[two], j[two]] = -y[rows[two], j[two]]
        active = rows
    return y


def block_cd(z: Tensor, M: Tensor, *, k: int, steps: int, gen: torch.Generator) -> Tensor:
    """From ``sign(M_pinv z)``, ``steps`` exhaustive searches over ``k`` random bits each.

    For a bit subset S with the other bits fixed, ``||r_S - M_S c||^2`` with
    ``r_S = z - M_{~S} y_{~S}`` is minimised over all ``c in {-1,+1}^k`` as one matmul
    ``||M_S c||^2 - 2 (M_S^T r_S) . c``; the current bits are among the candidates, so no step
    increases the distance.
    """
    M_pinv, _ = null_space(M)
    y = torch.where(z @ M_pinv.T >= 0, 1.0, -1.0)
    D = M.shape[1]
    C = all_codes(k)  # (2^k, k)
    rows = max(1, CHUNK_ELEMENTS // C.shape[0])
    for _ in range(steps):
        S = torch.randperm(D, generator=gen)[:k]
        keep = torch.ones(D, dtype=torch.bool)
        keep[S] = False
        MS = M[:, S]  # (d, k)
        q = (C @ MS.T).square().sum(-1)  # (2^k,)
        r = z - y[:, keep] @ M[:, keep].T  # (B, d)
        c = r @ MS  # (B, k)
        for r0 in range(0, z.shape[0], rows):
            score = torch.addmm(q, c[r0:r0 + rows], C.T, alpha=-2.0)  # (b, 2^k)
            sub = y[r0:r0 + rows]
            sub[:, S] = C[score.argmin(dim=1)]
    return y


def offset_win_counts(z: Tensor, M: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Which offsets give each row's best candidate ``sign(M_pinv z + offset)``.

    Returns ``(counts (P,), first (B,), codes (B, D))``: per offset the rows for which its
    candidate equals the row's best code (every tying offset counts), the first best offset per
    row, and the best codes (as ``_search_pinv``'s).
    """
    M_pinv, _ = null_space(M)
    u = z @ M_pinv.T
    P, D = offsets.shape
    counts = torch.zeros(P, dtype=torch.long)
    first = torch.empty(z.shape[0], dtype=torch.long)
    codes = torch.empty_like(u)
    rows = max(1, CHUNK_ELEMENTS // (P * D))
    for r0 in range(0, z.shape[0], rows):
        y = torch.where(u[r0:r0 + rows, None, :] + offsets[None] >= 0, 1.0, -1.0)  # (b, P, D)
        dist = (y @ M.T - z[r0:r0 + rows, None, :]).square().sum(-1)  # (b, P)
        arg = dist.argmin(dim=1)
        best = y[torch.arange(len(arg)), arg]  # (b, D)
        counts += (y == best[:, None, :]).all(-1).sum(0)
        first[r0:r0 + rows] = arg
        codes[r0:r0 + rows] = best
    return counts, first, codes


def subspace_offsets(M: Tensor, k: int, bases: int) -> Tensor:
    """Paddings over the first ``k`` null directions of each basis, scaled to the full norm."""
    P = all_codes(k)  # (2^k, k)
    full = M.shape[1] - M.shape[0]
    return torch.cat([P @ N[:k] * math.sqrt(full / k) for N in null_bases(M, bases)])


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------
def variant_names() -> list[str]:
    names = [REF, "pinv_1b", "pinv_4b_pairflip", "pinv_1b_pairflip"]
    for k in SUBSPACE_K:
        for b in (1, 4):
            names += [f"subspace_k{k}_b{b}", f"subspace_k{k}_b{b}_pairflip"]
    names += [f"random_k{k}" for k in RANDOM_K]
    names += [f"blockcd_k{k}_n{s}" for k in BLOCKCD_K for s in BLOCKCD_STEPS]
    names += [f"learned_top{k}" for k in LEARNED_TOP]
    return names


def run_variants(M: Tensor, z: Tensor, args, selected: list[str]) -> list[dict]:
    """Measure every selected variant on the test rows ``z``; ``REF`` is always measured."""
    full_off = padding_offsets(M, bases=REF_BASES)  # (4 * 2^(D-d), D)
    n_pad = 1 << (M.shape[1] - M.shape[0])
    results: dict[str, dict] = {}

    def record(name: str, y: Tensor, *, candidates: int, seconds: float, pre: Tensor,
               refine: str, **extra) -> None:
        err = per_sample_error(z, M, y)
        res = {"variant": name, "candidates": int(candidates), "refine": refine, "err": err,
               "mse_before_refine": round(float(per_sample_error(z, M, pre).mean()), 6),
               "seconds": round(seconds, 2), **extra}
        results[name] = res
        print(f"  {name:<26} cand {candidates:>7}  mse {float(err.mean()):.5f}  "
              f"({res['seconds']:.1f} s)", flush=True)

    def with_refinements(base: str, offsets: Tensor, *, refine_pair: bool) -> None:
        """One candidate search, refined by single flips and (``refine_pair``) by pairs."""
        t0 = time.perf_counter()
        pre, _ = _search_pinv(z, M, offsets)
        t_search = time.perf_counter() - t0
        for name, fn, how in ((base, refine_flips, "single"),
                              (f"{base}_pairflip", refine_pairs, "single+pair")):
            if name in selected and (refine_pair or fn is refine_flips):
                t1 = time.perf_counter()
                y = fn(z, pre, M)
                record(name, y, candidates=offsets.shape[0], pre=pre, refine=how,
                       seconds=t_search + time.perf_counter() - t1)

    with_refinements("pinv_4b", full_off, refine_pair=True)
    if {"pinv_1b", "pinv_1b_pairflip"} & set(selected):
        with_refinements("pinv_1b", full_off[:n_pad], refine_pair=True)
    for k in SUBSPACE_K:
        for b in (1, 4):
            base = f"subspace_k{k}_b{b}"
            if {base, f"{base}_pairflip"} & set(selected):
                with_refinements(base, subspace_offsets(M, k, b), refine_pair=True)
    gen = torch.Generator().manual_seed(args.seed + 2)
    for k in RANDOM_K:
        pick = torch.randperm(full_off.shape[0], generator=gen)[:REF_BASES << k]
        if f"random_k{k}" in selected:
            with_refinements(f"random_k{k}", full_off[pick], refine_pair=False)
    gen = torch.Generator().manual_seed(args.seed + 3)
    for k in BLOCKCD_K:
        for s in BLOCKCD_STEPS:
            name = f"blockcd_k{k}_n{s}"
            if name not in selected:
                continue
            t0 = time.perf_counter()
            pre = block_cd(z, M, k=k, steps=s, gen=gen)
            y = refine_flips(z, pre, M)
            record(name, y, candidates=s << k, pre=pre, refine="single",
                   seconds=time.perf_counter() - t0)
    learned = [k for k in LEARNED_TOP if f"learned_top{k}" in selected]
    if learned:
        t0 = time.perf_counter()
        zt = torch.randn(args.train_n, M.shape[0],
                         generator=torch.Generator().manual_seed(args.seed + 1))
        counts, first, codes = offset_win_counts(zt, M, full_off)
        check = min(16, args.train_n)  # the helper's codes are _search_pinv's
        if not torch.equal(codes[:check], _search_pinv(zt[:check], M, full_off)[0]):
            raise RuntimeError("offset_win_counts disagrees with _search_pinv")
        order = torch.sort(counts, descending=True, stable=True).indices
        t_train = time.perf_counter() - t0
        print(f"  learned: training pass {t_train:.1f} s, {int(first.unique().numel())} distinct "
              f"first winners of {args.train_n}, {int((counts > 0).sum())} offsets best "
              "somewhere", flush=True)
        stats = {"train_n": args.train_n,
                 "train_distinct_first_winners": int(first.unique().numel()),
                 "train_offsets_best_somewhere": int((counts > 0).sum()),
                 "train_seconds": round(t_train, 2)}
        for k in learned:
            t0 = time.perf_counter()
            top = order[:k]
            pre, _ = _search_pinv(z, M, full_off[top])
            y = refine_flips(z, pre, M)
            record(f"learned_top{k}", y, candidates=k, pre=pre, refine="single",
                   seconds=time.perf_counter() - t0,
                   train_top_best_somewhere=int(counts[top].gt(0).sum()), **stats)
    return [results[name] for name in dict.fromkeys([REF, *selected]) if name in results]


def summarise(res: list[dict], ref_err: Tensor) -> None:
    """Replace each result's per-sample errors by mse, se, ratio and paired difference."""
    ref = float(ref_err.mean())
    for r in res:
        err = r.pop("err")
        diff = err - ref_err
        n = err.numel()
        r["mse"] = round(float(err.mean()), 6)
        r["se"] = round(float(err.std() / math.sqrt(n)), 6)
        r["ratio_to_ref"] = round(float(err.mean()) / ref, 4)
        r["diff_vs_ref"] = round(float(diff.mean()), 6)
        r["diff_se"] = round(float(diff.std() / math.sqrt(n)), 6)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--lattice", default="24to8")
    p.add_argument("--n", type=int, default=2048, help="test samples z ~ N(0, I_d)")
    p.add_argument("--seed", type=int, default=0,
                   help="test samples; seed+1: learned's training set, +2/+3: random subsets")
    p.add_argument("--train_n", type=int, default=4096, help="training samples for learned_top*")
    p.add_argument("--variants", default="*",
                   help="comma-separated names or globs (pinv_4b, the reference, always runs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "bench" / "lattice" / "search_alternatives.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = LatticeSpec.parse(args.lattice)
    if spec.lifted_dim - spec.target_dim != 16:
        p.error("the variants' sizes (subspace k <= 12, 2^16 paddings) assume D - d = 16")
    names = variant_names()
    pats = [s.strip() for s in args.variants.split(",") if s.strip()]
    selected = [v for v in names if v == REF or any(fnmatch.fnmatchcase(v, pat) for pat in pats)]
    unknown = [pat for pat in pats if not any(fnmatch.fnmatchcase(v, pat) for v in names)]
    if unknown:
        p.error(f"no variant matches {unknown}; variants: {', '.join(names)}")
    M = load_projection(spec)
    z = torch.randn(args.n, spec.target_dim, generator=torch.Generator().manual_seed(args.seed))
    t0 = time.perf_counter()
    print(f"{spec}: n={args.n} seed={args.seed} train_n={args.train_n} "
          f"threads={torch.get_num_threads()}", flush=True)
    res = run_variants(M, z, args, selected)
    ref_err = next(r["err"] for r in res if r["variant"] == REF)
    summarise(res, ref_err)
    fields = record_fields()
    rows = [{"lattice": str(spec), "n": args.n, "seed": args.seed, "train_n": None, **r,
             **fields} for r in res]  # train_n: set on the learned rows only
    merge_json_rows(args.out, rows, ("lattice", "variant", "n", "seed", "train_n", *RECORD_KEY))
    print(f"\n{spec}, n={args.n}, seed={args.seed}: {time.perf_counter() - t0:.0f} s, "
          f"rows merged into {args.out}")
    print(f"{'variant':<26} {'candidates':>10} {'mse':>9} {'se':>8} {'ratio':>7} "
          f"{'diff vs ref':>12} {'± se':>8}")
    for r in res:
        print(f"{r['variant']:<26} {r['candidates']:>10} {r['mse']:>9.5f} {r['se']:>8.5f} "
              f"{r['ratio_to_ref']:>7.3f} {r['diff_vs_ref']:>+12.5f} {r['diff_se']:>8.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
