"""Bits-vs-quality sweep (the paper's Figure 1 for any model): quantize, evaluate, CSV, plot.

    python scripts/pareto.py --model demo --configs 16to8,24to10,20to8,24to8 \
        --baselines rtn:2,3,4 gptq:2,3,4 --tasks pack --csv bench/quality/quality.csv --budget_gb 0.1

Every main.py flag is accepted and applies to every run (--nsamples, --epochs, --group_size,
--eval_max_windows, ...). Per config: LiftQuant lattice ``DtoD'`` or baseline ``rtn:B`` /
``gptq:B`` -> liftquant.apps.api.run_quantization (perplexity always on, lm-eval with --tasks) -> one
CSV row (COLUMNS, with commit, dirty flag, source hash, GPU, date, torch version, command)
merged into --csv: a re-run replaces its own rows, rows of other commits and GPUs are kept. The FP
model is evaluated first (--skip_fp to not).
size_gb = bytes as stored (codes + side tensors + unquantized tensors in the model dtype), 1e9 B.
The plot (PNG, needs matplotlib; skipped with a warning otherwise) shows perplexity, and task
average when present, against size for every model in the CSV, the FP point as a star and the
--budget_gb line.
"""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_fp(ns, *, model_name: str, tasks_note: str, gpu: str, commit: str) -> dict:
    """The FP reference row (bits = the linear weights' dtype width)."""
    from liftquant.apps import api
    from liftquant.cli.config import RunConfig, apply_demo_defaults
    from liftquant.evaluation.pareto import csv_row
    from liftquant.io.checkpoint import bits_report

    ns = copy.copy(ns)
    apply_demo_defaults(ns)
    cfg = RunConfig.from_args(ns)
    device = api.resolve_device(cfg.model.device)
    model, tok = api.load_model_for_run(cfg)
    summary = {"ppl_quantized": api.eval_perplexity(model, tok, cfg, device), "calib_tokens": 0}
    if cfg.run.tasks:
        summary["tasks"] = api.eval_tasks(model, tok, cfg, device)
    bits = bits_report(model)
    weight = model.get_input_embeddings().weight
    bits["quantized_linears"]["bpw_total"] = weight.element_size() * 8
    return csv_row(summary, model=model_name, method="fp", config=str(weight.dtype)[6:], bits=bits,
                tasks_note=tasks_note, gpu=gpu, commit=commit)


def main(argv: list[str] | None = None) -> int:
    from liftquant.cli.config import apply_demo_defaults, build_parser
    from liftquant.evaluation.pareto import append_rows, csv_row, parse_jobs, plot

    parser = build_parser(__doc__.split("\n")[0])
    g = parser.add_argument_group("sweep")
    g.add_argument("--configs", default=None, help="LiftQuant lattices, e.g. 16to8,24to10")
    g.add_argument("--baselines", nargs="*", default=[], help="e.g. rtn:2,3,4 gptq:2,3,4")
    g.add_argument("--csv", default="bench/quality/quality.csv", help="CSV to append rows to")
    g.add_argument("--plot", default=None, help="PNG path (default: CSV path with .png)")
    g.add_argument("--budget_gb", type=float, default=None, help="memory budget line (GB)")
    g.add_argument("--model_name", default=None, help="model label in the CSV")
    g.add_argument("--skip_fp", action="store_true", help="do not evaluate the FP model")
    g.add_argument("--keep_checkpoints", action="store_true", help="keep every checkpoint")
    ns = parser.parse_args(argv)
    try:
        jobs = parse_jobs(ns.configs, ns.baselines)
    except ValueError as exc:
        parser.error(str(exc))
    from liftquant.apps.api import run_quantization
    from liftquant.cli.config import RunConfig
    from liftquant.util.log import setup_logging
    from liftquant.util.provenance import record_fields

    setup_logging()
    ns.eval_ppl = True
    root = Path(ns.save_dir or "out/pareto")
    name = ns.model_name or ("smollm2-135m" if ns.model in (None, "demo") else Path(ns.model).name)
    prov = record_fields(device="cpu" if ns.device == "cpu" else None)  # as the run starts
    from liftquant.evaluation.tasks import resolve_tasks

    tasks_note = "+".join(resolve_tasks(ns.tasks)) if ns.tasks else ""
    if ns.tasks and ns.tasks_limit:
        tasks_note += f"@limit{ns.tasks_limit}"
    common = {"model_name": name, "tasks_note": tasks_note, "gpu": prov["gpu"],
              "commit": prov["commit"]}
    if not ns.skip_fp:
        append_rows(ns.csv, [{**run_fp(ns, **common), **prov}])
    for method, config, bits in jobs:
        job = copy.copy(ns)
        job.method = method
        job.expc = config if method == "liftquant" else job.expc
        job.baseline_bits = bits
        job.save_dir = str(root / f"{name}-{config}{bits or ''}")
        apply_demo_defaults(job)
        summary = run_quantization(RunConfig.from_args(job))
        append_rows(ns.csv, [{**csv_row(summary, method=method, config=summary["lattice"],
                                        bits=summary["bits"], model=name, tasks_note=tasks_note,
                                        gpu=prov["gpu"], commit=prov["commit"]), **prov}])
        if not ns.keep_checkpoints:
            shutil.rmtree(job.save_dir, ignore_errors=True)
    png = plot(ns.csv, ns.plot or Path(ns.csv).with_suffix(".png"), budget_gb=ns.budget_gb)
    print(f"rows merged into {ns.csv}" + (f"; plot {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
