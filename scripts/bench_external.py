"""Quantize a model with an external, well-kept quantizer and score it with LiftQuant's own code.

    pip install auto-round            # optional; only this script imports it
    python scripts/bench_external.py --model demo --bits 2,3,4 --group_size 128 \
        --nsamples 128 --seqlen 1024 --iters 200 --csv bench/quality/quality.csv

Per bit width: fresh FP model -> the external quantizer (weights fake-quantized in place) ->
a check that every group really holds at most 2^b distinct values -> perplexity with
:func:`liftquant.evaluation.eval.perplexity` on the same windows as the toolkit's quality rows
(wiki-offline evaluation split, ``--eval_seqlen`` 2048, all windows) -> one row merged into
``--csv`` (``liftquant.util.records.merge_csv_rows``; other rows are kept) with method = the
quantizer, config ``<quantizer>-w{b}g{g}``, ``peer=external`` and the package version.
Calibration windows come from :func:`liftquant.evaluation.data.load_calibration` (same ``--nsamples``,
``--seqlen`` and ``--seed`` give the very ids our GPTQ runs see). Bits are counted as for our
baselines: ``b`` per weight + per group a float16 scale and a ``b``-bit zero.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CALIB_SOURCE = EVAL_SOURCE = "wiki-offline"
SCALE_BITS = 16  # float16 scale per group, as liftquant.quantize.baselines stores it


def _autoround(model, tok, calib, *, bits: int, group_size: int, sym: bool, iters: int,
               batch_size: int, device, seed: int, compile_: bool) -> tuple[str, str]:
    """AutoRound (SignRound, Cheng et al. 2023); returns (package version, settings)."""
    try:
        from auto_round import AutoRound
    except ImportError as exc:
        raise SystemExit(f"--quantizer autoround needs the auto-round package "
                         f"(pip install auto-round): {exc}") from exc
    n, seq_len = calib.shape
    ar = AutoRound(model, tok, bits=bits, group_size=group_size, sym=sym, iters=iters,
                   dataset=[calib[i:i + 1] for i in range(n)], nsamples=n, seqlen=seq_len,
                   batch_size=batch_size, seed=seed, enable_torch_compile=compile_,
                   device_map=str(device) if device.type == "cuda" else "cpu")
    ar.quantize()  # leaves the fake-quantized (dequantized) weights in the model's linears
    settings = (f"iters={iters} sym={sym} nsamples={n} seqlen={seq_len} batch={batch_size} "
                f"seed={seed}")
    return f"auto-round=={importlib.metadata.version('auto-round')}", settings


QUANTIZERS = {"autoround": _autoround}
REQUIRES = {"autoround": ("auto_round", "auto-round")}  # quantizer -> (module, pip package)


def check_grid(model, adapter, *, bits: int, group_size: int) -> dict[str, dict]:
    """Fail unless each (row, group) of every adapter linear holds <= 2^bits distinct values;
    returns the per-layer storage bits (``baselines.storage_bits`` form) of that format."""
    import torch

    out = {}
    blocks = adapter.get_blocks(model)
    for i, block in enumerate(blocks):
        for name in adapter.linear_names(block):
            w = adapter.get_linear(block, name).weight.detach().float()
            out_f, in_f = w.shape
            gs = group_size or in_f
            n_groups = math.ceil(in_f / gs)
            g = torch.nn.functional.pad(w, (0, n_groups * gs - in_f), value=float("nan"))
            g = g.reshape(out_f * n_groups, gs).sort(dim=1).values  # NaN padding sorts last
            distinct = ((g[:, 1:] != g[:, :-1]) & ~g[:, 1:].isnan()).sum(dim=1) + 1
            if int(distinct.max()) > 2**bits:
                raise RuntimeError(f"{adapter.blocks}.{i}.{name}: a group holds "
                                   f"{int(distinct.max())} values > 2^{bits}: not quantized")
            bias = adapter.get_linear(block, name).bias
            out[f"{adapter.blocks}.{i}.{name}"] = {
                "code_bits": out_f * in_f * bits, "weights": out_f * in_f,
                "side_bits": out_f * n_groups * (SCALE_BITS + bits)
                + (0 if bias is None else bias.numel() * bias.element_size() * 8)}
    return out


def run_one(ns, bits: int) -> dict:
    import torch

    from liftquant.apps import api
    from liftquant.cli.config import RunConfig
    from liftquant.evaluation.data import load_calibration, load_eval_tokens
    from liftquant.evaluation.eval import perplexity
    from liftquant.io.checkpoint import bits_report
    from liftquant.models.adapters import get_adapter
    from liftquant.util.provenance import record_fields

    cfg = RunConfig.from_args(argparse.Namespace(model=ns.model, dtype=ns.dtype))
    device = api.resolve_device(ns.device)
    model, tok = api.load_model_for_run(cfg)
    adapter = get_adapter(model.config)
    calib = load_calibration(tok, source=CALIB_SOURCE, n_samples=ns.nsamples, seq_len=ns.seqlen,
                             seed=ns.seed)
    t0 = time.time()
    package, settings = QUANTIZERS[ns.quantizer](
        model, tok, calib, bits=bits, group_size=ns.group_size, sym=ns.sym, iters=ns.iters,
        batch_size=ns.batch_size, device=device, seed=ns.seed, compile_=ns.compile)
    seconds = time.time() - t0
    model = model.to(device=device, dtype=getattr(torch, ns.dtype)).eval()
    quantized = check_grid(model, adapter, bits=bits, group_size=ns.group_size)
    report = bits_report(model, quantized=quantized)
    ids = load_eval_tokens(tok, source=EVAL_SOURCE)
    ppl = perplexity(model, ids, seq_len=ns.eval_seqlen, device=device,
                     max_windows=ns.eval_max_windows)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu ({os.cpu_count()} cores)")
    group = f"g{ns.group_size}" if ns.group_size else "pc"
    return {**record_fields(device=device), "model": ns.model_name, "method": ns.quantizer,
            "config": f"{ns.quantizer}-w{bits}{group}",
            "bits_per_weight": round(report["quantized_linears"]["bpw_total"], 4),
            "size_gb": round(report["total_bytes"] / 1e9, 5), "ppl_wiki_offline": round(ppl, 4),
            "task_avg": "", "tasks": "", "calib_tokens": int(calib.numel()), "gpu": where,
            "peer": "external", "package": package, "settings": settings,
            "quantize_seconds": round(seconds, 1),
            "eval": f"{EVAL_SOURCE} seq{ns.eval_seqlen} windows={ns.eval_max_windows or 'all'}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--model", default="demo", help="HF folder, .gguf, hub id or 'demo'")
    p.add_argument("--model_name", default="smollm2-135m", help="model label in the CSV")
    p.add_argument("--quantizer", default="autoround", choices=sorted(QUANTIZERS))
    p.add_argument("--bits", default="4", help="comma-separated bit widths, e.g. 2,3,4")
    p.add_argument("--group_size", type=int, default=128, help="0: per-channel")
    p.add_argument("--sym", action="store_true", help="symmetric grid (default: asymmetric, "
                   "as liftquant.quantize.baselines)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0, help="calibration windows and the quantizer")
    p.add_argument("--iters", type=int, default=200, help="AutoRound tuning steps per block")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="let the quantizer torch.compile")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--device", default="auto", help="auto|cpu|cuda[:i]")
    p.add_argument("--eval_seqlen", type=int, default=2048)
    p.add_argument("--eval_max_windows", type=int, default=None, help="None: all windows")
    p.add_argument("--csv", default=None, help="merge the rows into this CSV")
    ns = p.parse_args(argv)
    module, package = REQUIRES[ns.quantizer]
    if importlib.util.find_spec(module) is None:  # fail before loading any model
        p.error(f"--quantizer {ns.quantizer} needs the {package} package (pip install {package})")
    from liftquant.evaluation.pareto import COLUMNS, KEY
    from liftquant.util.log import setup_logging
    from liftquant.util.records import merge_csv_rows

    setup_logging()
    for bits in (int(b) for b in ns.bits.split(",")):
        row = run_one(ns, bits)
        print(", ".join(f"{k}={row[k]}" for k in ("config", "bits_per_weight", "size_gb",
                                                  "ppl_wiki_offline", "quantize_seconds")))
        if ns.csv:
            merge_csv_rows(ns.csv, [row], KEY, columns=COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
