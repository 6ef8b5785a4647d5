"""Summarise main.py report.json files as a Markdown table (for bench/pipeline/README.md).

    python scripts/pipeline_report.py run1/report.json run2/report.json

The commit (``+dirty`` for a modified tree; a copied tree without .git shows the first 12 digits
of its ``source_sha256``, see ``python -m liftquant.util.provenance match``) and the GPU come from
each report's ``provenance``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def row(path: Path) -> str:
    r = json.loads(path.read_text())
    s, b, cfg = r["summary"], r["bits"], r["config"]
    q = b["quantized_linears"]
    blocks = r["blocks"]
    mean = lambda key: sum(x[key] for x in blocks) / len(blocks)
    return (f"| {path.stem.removeprefix('report_')} | {s['lattice']} | {q['bpw_codes']:.3f} | {q['bpw_total']:.3f} | "
            f"{b['total_bytes'] / 2**20:.1f} | {s.get('ppl_fp', float('nan')):.3f} | "
            f"{s.get('ppl_quantized', float('nan')):.3f} | {cfg['calib']['nsamples']}x"
            f"{cfg['calib']['seqlen']} | {cfg['train']['epochs']} | {mean('holdout_rounded'):.4f} | "
            f"{mean('holdout_corrected'):.4f} | {s['quantize_seconds']:.0f} | {s['peak_gib']:.2f} | "
            f"{_origin(r)} |")


def _origin(report: dict) -> str:
    """``commit[+dirty] / gpu`` of a report (older reports: their git_sha only)."""
    p = report.get("provenance")
    if p is None:
        return f"{report.get('git_sha', '?')} / ?"
    commit = p["commit_short"] if p["commit"] != "unknown" else f"src:{p['source_sha256'][:12]}"
    return f"{commit}{'+dirty' if p['dirty'] else ''} / {p['gpu']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("reports", nargs="+", type=Path)
    args = p.parse_args(argv)
    print("| run | lattice | bpw codes | bpw codes+side | model MiB | ppl FP | ppl quantized | "
          "calib | epochs | mean holdout rel. MSE after rounding | after block correction | "
          "quantize s | peak GPU GiB | commit / GPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in args.reports:
        print(row(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
