"""Bits-vs-quality sweep helpers (paper Figure 1): job list, CSV rows, headless plot.

Used by ``scripts/pareto.py``. CSV columns are :data:`COLUMNS`; ``size_gb`` is bytes as stored
(``checkpoint.bits_report``: codes + side tensors + unquantized tensors in the model dtype) in
units of 1e9 B; ``bits_per_weight`` is codes + side bits of the quantized linears (FP: the
weight dtype width). matplotlib is optional: :func:`plot` returns None with a warning without it.
Rows carry their provenance (:func:`liftquant.util.provenance.record_fields`) and are merged into the
CSV (:func:`liftquant.util.records.merge_csv_rows`): re-running a sweep replaces its own rows and
keeps those measured at other commits or on other GPUs.
"""

from __future__ import annotations

import csv
from pathlib import Path

from liftquant.util.fileio import atomic_write
from liftquant.util.log import get_logger
from liftquant.util.provenance import RECORD_KEY
from liftquant.util.records import merge_csv_rows

log = get_logger("pareto")

CORE_COLUMNS = ("model", "method", "config", "bits_per_weight", "size_gb", "ppl_wiki_offline",
                "task_avg", "tasks", "calib_tokens", "gpu", "commit")  # every file has these
COLUMNS = (*CORE_COLUMNS, "dirty", "source_sha256", "date", "torch", "command")
KEY = ("model", "method", "config", "tasks", "calib_tokens", *RECORD_KEY)  # one measurement
MARKERS = {"liftquant": "o", "rtn": "s", "gptq": "^"}


def parse_jobs(configs: str | None, baselines: list[str]) -> list[tuple[str, str, int | None]]:
    """``"24to8,20to8"`` + ``["rtn:2,3"]`` -> [("liftquant", "24to8", None), ("rtn", "rtn", 2), ..]."""
    jobs = [("liftquant", c.strip(), None) for c in (configs or "").split(",") if c.strip()]
    for item in baselines:
        method, _, bits = item.partition(":")
        if method not in ("rtn", "gptq") or not bits:
            raise ValueError(f"--baselines entry {item!r}: expected rtn:B[,B..] or gptq:B[,B..]")
        jobs += [(method, method, int(b)) for b in bits.split(",")]
    return jobs


def _check_columns(path: Path, header) -> None:
    missing = [c for c in CORE_COLUMNS if c not in (header or ())]
    if missing:
        raise ValueError(f"{path} has columns {header}, expected {list(COLUMNS)} "
                         f"(missing {missing})")


def append_rows(path: str | Path, rows: list[dict]) -> None:
    """Add ``rows`` to the CSV at ``path``: a row with the same :data:`KEY` (configuration,
    GPU, commit and source hash) is replaced, rows of other runs are kept; a file without the
    :data:`CORE_COLUMNS` raises."""
    path = Path(path)
    if path.is_file() and path.stat().st_size:
        with open(path, newline="") as f:
            _check_columns(path, next(csv.reader(f), None))
    merge_csv_rows(path, [{k: row.get(k, "") for k in COLUMNS} for row in rows], KEY,
                   columns=COLUMNS)


def merge(paths: list[str | Path], out: str | Path) -> int:
    """Rows of several sweep CSVs (e.g. jobs run in parallel) into ``out``, one row per
    (model, method, config) -- the last one read wins -- sorted by model, method, size.
    Returns the number of rows written."""
    rows: dict[tuple, dict] = {}
    fields = list(COLUMNS)
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            _check_columns(Path(path), reader.fieldnames)
            fields += [c for c in reader.fieldnames or () if c not in fields]
            for r in reader:
                rows[(r["model"], r["method"], r["config"])] = r
    order = {"fp": 0, "liftquant": 1, "gptq": 2, "rtn": 3}
    ranked = sorted(rows.values(), key=lambda r: (r["model"], order.get(r["method"], 9),
                                                  _num(r["size_gb"]) or 0.0))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(ranked)

    atomic_write(out, write)
    return len(ranked)


def _num(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def plot(csv_path: str | Path, png: str | Path, *, budget_gb: float | None = None) -> Path | None:
    """Perplexity (and task average) vs size per model of the CSV; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    with open(csv_path, newline="") as f:
        latest = {(r["model"], r["method"], r["config"]): r for r in csv.DictReader(f)}
    models = list(dict.fromkeys(k[0] for k in latest))
    has_tasks = any(_num(r["task_avg"]) is not None for r in latest.values())
    metrics = ["ppl_wiki_offline"] + (["task_avg"] if has_tasks else [])
    fig, axes = plt.subplots(len(metrics), len(models), squeeze=False,
                             figsize=(5.5 * len(models), 4 * len(metrics)))
    for col, model in enumerate(models):
        rows = [r for k, r in latest.items() if k[0] == model]
        for row_i, metric in enumerate(metrics):
            ax = axes[row_i][col]
            for method in dict.fromkeys(r["method"] for r in rows):
                pts = sorted((_num(r["size_gb"]), _num(r[metric]), r["config"]) for r in rows
                             if r["method"] == method and _num(r[metric]) is not None)
                if not pts:
                    continue
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                if method == "fp":
                    ax.scatter(xs, ys, marker="*", s=200, color="k", label="FP", zorder=3)
                    continue
                ax.plot(xs, ys, marker=MARKERS.get(method, "x"), label=method)
                for x, y, name in pts:
                    ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
            if budget_gb:
                ax.axvline(budget_gb, ls="--", color="gray", label=f"budget {budget_gb} GB")
            if metric == "ppl_wiki_offline":
                ax.set_yscale("log")
            ax.set(title=model, xlabel="model size (GB)",
                   ylabel="wiki-offline perplexity" if row_i == 0 else "task average acc")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return Path(png)


def csv_row(summary: dict, *, model: str, method: str, config: str, bits: dict, tasks_note: str,
         gpu: str, commit: str) -> dict:
    tasks = summary.get("tasks")
    return {"model": model, "method": method, "config": config,
            "bits_per_weight": round(bits["quantized_linears"]["bpw_total"], 4),
            "size_gb": round(bits["total_bytes"] / 1e9, 5),
            "ppl_wiki_offline": round(summary["ppl_quantized"], 4),
            "task_avg": round(tasks["task_avg"], 4) if tasks else "",
            "tasks": tasks_note if tasks else "", "calib_tokens": summary.get("calib_tokens", 0),
            "gpu": gpu, "commit": commit}


def main(argv: list[str] | None = None) -> int:
    """``python -m liftquant.evaluation.pareto merge A.csv B.csv --out quality.csv [--plot P]``"""
    import argparse

    p = argparse.ArgumentParser(prog="python -m liftquant.evaluation.pareto", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge sweep CSVs and redraw the plot")
    m.add_argument("csvs", nargs="+")
    m.add_argument("--out", required=True)
    m.add_argument("--plot", default=None)
    m.add_argument("--budget_gb", type=float, default=None)
    args = p.parse_args(argv)
    n = merge(args.csvs, args.out)
    png = plot(args.out, args.plot, budget_gb=args.budget_gb) if args.plot else None
    print(f"{n} rows -> {args.out}" + (f"; plot {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
