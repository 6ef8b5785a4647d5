"""Render lattice/README.md from lattice/index.json and bench/lattice/lattice.csv.

    python scripts/lattice_table.py
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Paper Table 1 (Gaussian-source MSE) and, where the paper prints none, the authors' released
# matrices as measured with exhaustive search (SPEC §2 / issue 2).
PAPER = {"16to8": 0.089, "32to16": 0.082, "30to14": 0.070, "24to10": 0.053, "32to20": 0.146}
RELEASED = {"16to8": 0.092, "20to8": 0.050, "24to8": 0.0256}
# Which benchmark method is the quantizer's search on a GPU for each search kind.
# (pinv: the bases count comes from the lattice's index entry, see lattice.search_bases.)
GPU_METHOD = {"exhaustive": "exhaustive_triton", "pinv": "pinv{bases}b_triton_flip"}

# Within this many standard errors of the paper's value a lattice is "within noise".
NOISE_SE = 2.0

HEADER = """# Shipped lattices

Each `<D>to<d>.pt` is a plain float32 tensor M of shape (d, D) (load with
`torch.load(path, weights_only=True)`): D sign bits decode d weights, D/d bits per weight.
All were trained by `lattice_generator.py` (soft-min objective, Adam, cosine decay,
restarts; settings per lattice in `index.json`). MSE is per dimension, the mean of
e_i = ||z_i - M y_i||^2 / d over n = 100,000 N(0, I_d) vectors (`n_eval`; the stream
`lattice.gaussian_mse` draws from seed 1234, recorded as `eval_seed`; the `seed` field is the
training seed) with the search the quantizer uses (`search`: exhaustive = exact; pinv =
null-space heuristic over all 2^(D-d) paddings of the `bases` null-space bases recorded in
`index.json` (4: a canonical one and three fixed rotations, `lattice.null_bases`) + greedy
bit flips). **SE** is the standard error of that mean, std(e_i) / sqrt(n) (`mse_se`); the
**re-check** is an independent measurement on another stream (`recheck`: seed 4321, same n
and search, on the GPU named there). Both come from `scripts/measure_lattices.py`, which
reproduced every recorded MSE to within 1e-5 relative before recording them.
`tests/test_lattice_claims.py` re-measures every lattice on CPU in CI.

## Against the paper's Table 1

A lattice is *below* (or *above*) a reference when its MSE is more than {noise:g} SE under
(over) it, else *within noise*. The paper prints three decimals, so its own rounding
(+-0.0005) is 2.7-5.4 SE of these estimates: *within noise* also means "equal at the paper's
precision", not "better". Released = the authors' released matrices, measured here.

| lattice | MSE +- SE | re-check +- SE | reference | difference | verdict |
|---|---|---|---|---|---|
{claims}

**16to8 is above the paper's 0.089** (by 1.9 %, 9 SE), though below the authors' released
matrix (0.092). Training more did not close the gap (2026-12-01, NVIDIA H200, full 2^16-code
soft-min, `lattice_generator.py`): 39 further restarts over 8 settings (3000-6000 steps,
batch 512 or 2048, lr 0.01-0.03, tau 5-10 annealed to 60-300) scored 0.0901-0.0911 on their
20,000 selection vectors, and on 10^6 fresh vectors (seed 777) the best three measured
0.09064-0.09069 +- 0.00006 against the shipped matrix's 0.09056 +- 0.00006. Lloyd polishing
the shipped matrix (12 iterations, 2e6 vectors each) reached 0.09051 +- 0.00006, -0.06 %: not
worth a new matrix (checkpoints record the lattice's hash). So the shipped 16to8 stays. On the
2-core CPU the recipe is out of reach anyway: a full-codebook step (batch 512) takes 7.2 s,
about 6 hours per 3000-step restart; the pinv-candidate step (0.79 s, default `--budget`) is
40 minutes per restart and trains on a different candidate set.

**Lloyd polishing** (`lattice_generator.py --init M.pt --steps 0 --lloyd K`): the codes of 2e6
fresh Gaussian vectors under the quantizer's own search, then the least-squares M for those
codes, repeated. Soft-min training leaves M slightly off this fixed point. 32to16 ships
polished: 14 iterations with the 4-basis search, then 10 with 8 bases, took it from 0.08228
to 0.08194 +- 0.00011 (8 bases; 0.08197 with 6, 0.08207 with 4), 0.5 SE under the paper's
0.082: within noise, confirmed by the re-check (0.08194 +- 0.00011). The same 8 iterations
(4 bases, H100) also lowered 30to14 0.06885 -> 0.06857, 24to10 0.05139 -> 0.05123, 20to8
0.04685 -> 0.04673 and 24to8 0.02467 -> 0.02444. Those matrices are not shipped yet, because
`bench/quality/quality.csv` was measured with the current ones; 16to8 (exhaustive search) gained
nothing then, measured through the Triton search, whose per-matrix code-norm cache can serve
a new matrix stale values; on the torch path it gains 0.06 % (above).

## All lattices

Effective bits = 1/2 log2(1/MSE); the Gaussian rate-distortion bound is D(R) = 2^(-2R).
Search times are seconds per 10^6 Gaussian weights on the GPU named in `bench/lattice/lattice.csv`
(commit per row there; `scripts/bench_lattice.py`); "-" = not benchmarked. The 4-basis
search costs 3.3-4.5x the 1-basis time, the 8-basis search of 32to16 7.7x.

Regenerate this file with `python scripts/lattice_table.py`.

| lattice | bits | search | MSE | SE | paper / released | effective bits | R-D bound | gap (bits) | s/1M: quantizer search | s/1M: pinv 1 basis, Triton | s/1M: pinv torch baseline |
|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def verdict(mse: float, se: float, ref: float) -> tuple[str, float]:
    """("below" | "within noise" | "above", difference in SE) of ``mse +- se`` against ``ref``."""
    z = (mse - ref) / se
    return ("below" if z < -NOISE_SE else "above" if z > NOISE_SE else "within noise"), z


def claims(rows: list[dict]) -> list[str]:
    """One table row per (lattice, reference): the paper's first, then released matrices."""
    out = []
    by_name = {r["name"]: r for r in rows}
    refs = [(n, v, "paper") for n, v in PAPER.items()]
    refs += [(n, v, "released") for n, v in RELEASED.items()]
    for name, ref, what in refs:
        r = by_name.get(name)
        if r is None:
            out.append(f"| {name} | not shipped | - | {what} {ref:.4g} | - | - |")
            continue
        mse, se = r["mse"], r.get("mse_se")
        rc = r.get("recheck")
        rc_s = "-" if rc is None else f"{rc['mse']:.5f} +- {rc['se']:.5f}"
        if se is None:
            out.append(f"| {name} | {mse:.5f} (no SE recorded) | {rc_s} | {what} {ref:.4g} | "
                       f"{mse - ref:+.5f} | unknown |")
            continue
        v, z = verdict(mse, se, ref)
        ref_s = f"{ref:.3f}" if what == "paper" else f"{ref:.4f}"
        out.append(f"| {name} | {mse:.5f} +- {se:.5f} | {rc_s} | {what} {ref_s} | "
                   f"{mse - ref:+.5f} ({z:+.1f} SE, {100 * (mse / ref - 1):+.1f} %) | {v} |")
    return out


def _time(bench: dict, name: str, method: str) -> str:
    b = bench.get((name, method))
    return "-" if b is None else f"{float(b['seconds_per_1M']):.4f}"


def main() -> int:
    rows = json.loads((ROOT / "lattice" / "index.json").read_text())
    bench = {}
    bench_file = ROOT / "bench" / "lattice" / "lattice.csv"
    if bench_file.is_file():
        for r in csv.DictReader(bench_file.open()):
            bench[(r["lattice"], r["method"])] = r
    lines = [HEADER.replace("{noise:g}", f"{NOISE_SE:g}").replace("{claims}",
                                                                     "\n".join(claims(rows)))]
    for r in rows:
        mse, bits = r["mse"], r["bits"]
        eff = 0.5 * math.log2(1 / mse)
        ref = PAPER.get(r["name"]) or RELEASED.get(r["name"])
        ref_s = "-" if ref is None else (f"{ref:.4f}" + ("" if r["name"] in PAPER else " (rel.)"))
        quantizer = GPU_METHOD[r["search"]].format(bases=r.get("bases"))
        t = [_time(bench, r["name"], m) for m in
             (quantizer, "pinv_triton_flip", "pinv_torch_baseline")]
        se = "-" if r.get("mse_se") is None else f"{r['mse_se']:.5f}"
        lines.append(f"| {r['name']} | {bits:.3f} | {r['search']} | {mse:.5f} | {se} | {ref_s} | "
                     f"{eff:.3f} | {2 ** (-2 * bits):.5f} | {bits - eff:.3f} | {' | '.join(t)} |\n")
    (ROOT / "lattice" / "README.md").write_text("".join(lines))
    print("".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
