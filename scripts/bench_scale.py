"""Quantization time and memory at real model sizes, on random-weight models of real shapes.

Builds a Llama-3-8B, Llama-3-70B, Qwen3.5-9B (hybrid linear attention) or Qwen3-30B-A3B (MoE)
shaped model (all blocks, or the first K of them) with random bf16 weights directly in memory,
then runs the real ``main.py`` pipeline on it
(``liftquant.apps.api.run_quantization``: memory plan, activation caches, block loop, packing,
checkpoint writing) with the authors' recipe flags, random calibration tokens, and the
requested lattice and calibration size. Writes, merging with earlier rows (keyed by
configuration, GPU, commit and source hash):

* ``bench/scale/scale.csv``: one row per run (``shape, lattice, nsamples, seqlen, blocks_run,
  blocks_total, seconds_per_block, total_seconds, projected, peak_gpu_gib, peak_host_gib, gpu,
  commit`` ...). ``total_seconds`` is measured (``projected`` 0) when every block ran, else
  projected as capture + first block + (blocks_total - 1) x mean of the later blocks
  (``projected`` 1). ``--project_nsamples N`` adds a row for N calibration samples projected
  from runs of this shape and lattice at two or more measured sample counts (per-block time
  fitted linearly in the sample count); with ``--project_only`` it runs nothing and projects
  from the rows already in ``--out`` whose source hash is ``--source`` (default: this tree's;
  no GPU needed);
* ``bench/scale/scale.json``: the same runs with the per-block time split (to_device, targets,
  stage1, holdout, search, stage2, pack, offload), the memory plan and the command.

Example (one H200)::

    python scripts/bench_scale.py --shape llama3-8b --expc 20to8 --nsamples 128 --seqlen 2048
    python scripts/bench_scale.py --shape llama3-70b --blocks 2 --max_gpu_memory 24 \
        --max_host_memory 4
    python scripts/bench_scale.py --shape llama3-8b --nproc 2   # torchrun on itself, 2 GPUs

``--nproc N`` relaunches this script under ``torchrun --standalone --nproc_per_node N`` (NVLink
multicast off, :mod:`liftquant.quantize.distributed`); every rank builds the same random model, rank 0
writes the row. ``wall_seconds`` (the measured quantization wall time of the blocks that ran)
is the column to compare across ``gpus``; ``total_seconds`` is not projected when ``gpus`` > 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (family, config fields). Llama-3 (rope scaling "llama3"), Qwen3.5 (hybrid: 3 Gated
# DeltaNet blocks then 1 gated full-attention block; the shape of transformers' default
# Qwen3_5TextConfig, which we take to be Qwen3.5-9B's: check it against the checkpoint's config),
# Qwen3-MoE (Qwen3-30B-A3B: 128 experts, 8 routed per token). "-tiny" shapes are CPU smoke tests.
SHAPES = {
    "llama3-8b": ("llama", {"hidden_size": 4096, "intermediate_size": 14336,
                            "num_hidden_layers": 32, "num_attention_heads": 32,
                            "num_key_value_heads": 8}),
    "llama-tiny": ("llama", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2}),
    "llama3-70b": ("llama", {"hidden_size": 8192, "intermediate_size": 28672,
                             "num_hidden_layers": 80, "num_attention_heads": 64,
                             "num_key_value_heads": 8}),
    "qwen3.5-9b": ("qwen3_5", {"hidden_size": 4096, "intermediate_size": 12288,
                               "num_hidden_layers": 32, "num_attention_heads": 16,
                               "num_key_value_heads": 4, "head_dim": 256,
                               "linear_num_key_heads": 16, "linear_num_value_heads": 32,
                               "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                               "vocab_size": 248320}),
    "qwen3.5-tiny": ("qwen3_5", {"hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 4, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "head_dim": 16,
                                 "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                                 "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                                 "vocab_size": 512}),
    "qwen3-moe-30b-a3b": ("qwen3_moe", {"hidden_size": 2048, "moe_intermediate_size": 768,
                                        "intermediate_size": 6144, "num_hidden_layers": 48,
                                        "num_attention_heads": 32, "num_key_value_heads": 4,
                                        "head_dim": 128, "num_local_experts": 128,
                                        "num_experts_per_tok": 8, "vocab_size": 151936}),
    "qwen3-moe-tiny": ("qwen3_moe", {"hidden_size": 64, "moe_intermediate_size": 32,
                                     "intermediate_size": 128, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "num_key_value_heads": 2,
                                     "head_dim": 16, "num_local_experts": 8,
                                     "num_experts_per_tok": 2, "vocab_size": 512}),
}
LLAMA3 = {"vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 131072, "tie_word_embeddings": False,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


def _config(shape: str):
    """(model class, config) of ``shape`` with all of its blocks."""
    family, fields = SHAPES[shape]
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM, LlamaConfig(**{**LLAMA3, **fields})
    if family == "qwen3_5":
        from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

        cfg = Qwen3_5TextConfig(**{**fields, "tie_word_embeddings": False})
        return Qwen3_5ForCausalLM, cfg
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM, Qwen3MoeConfig(**{**fields, "tie_word_embeddings": False})


# The authors' README recipe (SPEC §6) minus model/paths/calibration size, which are ours.
RECIPE = ["--wbits", "2", "--w_sym", "--abits", "16", "--kbits", "16", "--vbits", "16",
          "--true-sequential", "--act-order", "--use_fpinps", "--Rres_init", "Hadamard",
          "--epochs", "2", "--batch_size", "2", "--usefullfp", "--training_trans",
          "--finetuning_weights", "--align", "1", "--lscale_lr", "5e-3", "--lexw_lr", "2e-2",
          "--lw_lr", "2e-5", "--la_lr", "2e-3", "--lt_lr", "2e-4"]
WEIGHT_STD = 0.02  # typical std of Llama linear weights


def build_model(shape: str, blocks: int | None, *, seed: int = 0):
    """A random-weight causal LM of ``shape`` with its first ``blocks`` decoder blocks (bf16):
    matrices N(0, WEIGHT_STD) (fused 3-D expert tensors and the depthwise conv included), 1-D
    parameters (norms, the DeltaNet's A_log and dt_bias) 1.0, rotary buffers rebuilt."""
    cls, cfg = _config(shape)
    total = cfg.num_hidden_layers
    if blocks:
        blocks = min(blocks, total)
        cfg.num_hidden_layers = blocks
        if getattr(cfg, "layer_types", None):  # hybrid layout: keep the first K layer types
            cfg.layer_types = list(cfg.layer_types[:blocks])
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.ndim == 1:  # norms, A_log, dt_bias
                p.fill_(1.0)
                continue
            rows = max(1, 8192 // max(1, p[0].numel() // 8192)) if p.ndim > 2 else 8192
            for r in range(0, p.shape[0], rows):  # bounded temporaries
                chunk = torch.randn(p[r:r + rows].shape, generator=gen, device=dev)
                p[r:r + rows].copy_((chunk * WEIGHT_STD).to(torch.bfloat16))
        for mod_name, mod in list(model.named_modules()):  # buffers were left uninitialised
            if type(mod).__name__.endswith("RotaryEmbedding"):
                parent = model.get_submodule(mod_name.rsplit(".", 1)[0])
                setattr(parent, mod_name.rsplit(".", 1)[1], type(mod)(cfg))
    model.eval()
    return model, total


class Stopped(Exception):
    """SIGTERM (e.g. from ``timeout``) arrived: rows are written from the finished blocks."""


def _stop(signum, _frame):
    raise Stopped(f"stopped by signal {signum}")


def _peak_host_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """This script under torchrun with ``nproc`` ranks and ``argv`` minus ``--nproc`` (which
    torchrun's own parser would take as an abbreviation of ``--nproc_per_node``)."""
    own = [a for i, a in enumerate(argv) if a != "--nproc" and not a.startswith("--nproc=")
           and not (i and argv[i - 1] == "--nproc")]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc), str(Path(__file__).resolve()), *own]


def _launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run this script with the same arguments as ``nproc`` torchrun ranks on this host."""
    from liftquant.quantize.distributed import force_multicast_off

    env = dict(os.environ)
    force_multicast_off(env)
    cmd = torchrun_command(nproc, argv)
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def run_one(args, extra: list[str]) -> tuple[dict, dict] | None:
    from liftquant.apps.api import run_quantization
    from liftquant.cli.config import RunConfig, build_parser
    from liftquant.quantize import distributed
    from liftquant.util.provenance import provenance

    ctx = distributed.from_env()
    if ctx is not None:  # before the model is built: its generator runs on this rank's GPU
        ctx = distributed.init(ctx, cuda=torch.cuda.is_available())
        distributed.log_start(ctx)
    t0 = time.perf_counter()
    model, total_blocks = build_model(args.shape, args.blocks, seed=args.seed)
    build_s = time.perf_counter() - t0
    save_dir = args.save_dir or None
    if save_dir is None and (ctx is None or ctx.is_main):
        save_dir = tempfile.mkdtemp(prefix=f"lq_scale_{args.shape}_")
    if ctx is not None:  # every rank writes its blocks into rank 0's folder
        box = [save_dir]
        torch.distributed.broadcast_object_list(box, src=0)
        save_dir = box[0]
    save_dir = Path(save_dir)
    argv = ["--model", f"random:{args.shape}", "--save_dir", str(save_dir), "--expc", args.expc,
            "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), *RECIPE, *extra]
    cfg = RunConfig.from_args(build_parser("bench_scale").parse_args(argv))
    if ctx is not None:
        distributed.check_supported(cfg)
    ids = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen),
                        generator=torch.Generator().manual_seed(args.seed))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    signal.signal(signal.SIGTERM, _stop)  # `timeout` ends the run: keep the finished blocks
    stopped = ""
    try:
        summary = run_quantization(cfg, model=model, calib_ids=ids, dist_ctx=ctx)
        if ctx is not None and not ctx.is_main:
            return None  # rank 0 writes the row
        blocks = json.loads((save_dir / "report.json").read_text())["blocks"]
    except Stopped as exc:
        if ctx is not None and not ctx.is_main:
            return None
        stopped, summary = str(exc), {"checkpoint_bytes": 0}
        from liftquant.quantize.blockstore import read_block_json

        done = sorted((save_dir / "blocks").glob("block_*.safetensors"))  # written last
        blocks = [read_block_json(p)["row"] for p in done]
        if not blocks:
            raise SystemExit(f"bench_scale: {exc} before the first block finished") from None
    secs = [b["seconds"] for b in blocks]
    later = secs[1:] or secs
    capture = blocks[0].get("capture_seconds", 0.0)
    run = len(blocks)
    per_block = sum(later) / len(later)
    measured = run == total_blocks and not stopped
    gpus = 1 if ctx is None else ctx.world_size
    total = summary["quantize_seconds"] if measured else capture + secs[0] + (
        total_blocks - 1) * per_block
    if gpus > 1 and not measured:
        total = ""  # the projection assumes one process
    prov = provenance(device=torch.device("cuda") if torch.cuda.is_available() else None)
    row = {"shape": args.shape, "lattice": args.expc, "nsamples": args.nsamples,
           "seqlen": args.seqlen, "max_gpu_memory": args.max_gpu_memory or "",
           "max_host_memory": args.max_host_memory or "",
           "flags": " ".join(a for a in extra if not a.startswith("--max_")), "blocks_run": run,
           "blocks_total": total_blocks, "gpus": gpus,
           "wall_seconds": summary.get("quantize_seconds", ""),
           "first_block_seconds": round(secs[0], 2),
           "seconds_per_block": round(per_block, 2),
           "total_seconds": round(total, 1) if total != "" else "",
           "projected": 0 if measured else 1,
           "peak_gpu_gib": round(max(b["peak_gib"] for b in blocks), 2),
           "peak_host_gib": round(_peak_host_gib(), 2), "cache_mode": blocks[0]["cache_mode"],
           "checkpoint_mib": round(summary["checkpoint_bytes"] / 2**20, 1),
           "build_seconds": round(build_s, 1), "stopped": stopped, "gpu": prov["gpu"],
           "commit": prov["commit_short"], "dirty": prov["dirty"],
           "source_sha256": prov["source_sha256"][:16], "date": prov["date"][:10]}
    detail = {**row, "command": " ".join(sys.argv), "argv": argv, "provenance": prov,
              "blocks": [{k: b.get(k) for k in ("block", "rank", "seconds", "time_split",
                                                  "peak_gib", "memory_plan", "candidate_fraction",
                                                  "holdout_rounded", "holdout_corrected")}
                         for b in blocks]}
    if not args.save_dir:
        shutil.rmtree(save_dir, ignore_errors=True)
    return row, detail


KEY = ("shape", "lattice", "nsamples", "seqlen", "max_gpu_memory", "max_host_memory", "flags",
       "projected", "gpu", "gpus", "commit", "source_sha256")


def project(rows: list[dict], shape: str, expc: str, n_target: int) -> dict | None:
    """Per-block seconds fitted linearly in nsamples from measured runs of the same source."""
    pts = {}  # nsamples -> (measured seconds per block, row)
    for r in rows:
        if r["shape"] == shape and r["lattice"] == expc and int(r["blocks_run"] or 0) > 0:
            pts[int(r["nsamples"])] = (float(r["seconds_per_block"]), r)
    if len(pts) < 2:
        return None
    ns = sorted(pts)
    (n0, (t0, _)), (n1, (t1, base)) = (ns[0], pts[ns[0]]), (ns[-1], pts[ns[-1]])
    slope = (t1 - t0) / (n1 - n0)
    per = t1 + slope * (n_target - n1)
    total = per * int(base["blocks_total"])
    return {**base, "nsamples": n_target, "seconds_per_block": round(per, 2),
            "total_seconds": round(total, 1), "projected": 1, "first_block_seconds": "",
            "peak_gpu_gib": "", "peak_host_gib": "", "blocks_run": 0, "wall_seconds": "",
            "build_seconds": "",
            "note": f"linear in nsamples from measured {n0} and {n1}"}


def _project_only(args) -> int:
    """``--project_only``: the ``--project_nsamples`` row from rows already measured."""
    import csv

    from liftquant.util.provenance import provenance
    from liftquant.util.records import merge_csv_rows

    if not args.project_nsamples:
        raise SystemExit("error: --project_only needs --project_nsamples N")
    out = Path(args.out)
    src = (args.source or provenance()["source_sha256"])[:16]
    rows = [r for r in csv.DictReader(out.open()) if r["source_sha256"] == src
            and r.get("max_gpu_memory", "") == "" and r["projected"] in ("0", "1")
            and int(r["blocks_run"] or 0) > 0]
    gpus = {r["gpu"] for r in rows if r["shape"] == args.shape and r["lattice"] == args.expc}
    if len(gpus) != 1:
        raise SystemExit(f"error: --project_only needs runs of {args.shape}/{args.expc} on one "
                         f"GPU with this tree's source {src} in {out}; found GPUs {sorted(gpus)}")
    proj = project([r for r in rows if r["gpu"] in gpus], args.shape, args.expc,
                   args.project_nsamples)
    if proj is None:
        raise SystemExit(f"error: --project_only needs runs at two or more sample counts of "
                         f"{args.shape}/{args.expc} with source {src} in {out}")
    merge_csv_rows(out, [proj], KEY)
    print("projected:", json.dumps(proj))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--expc", default="20to8")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--blocks", type=int, default=None, help="first K blocks only (default all)")
    p.add_argument("--max_gpu_memory", type=float, default=None)
    p.add_argument("--max_host_memory", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_dir", default=None, help="keep the checkpoint here (default: temp)")
    p.add_argument("--project_nsamples", type=int, default=None)
    p.add_argument("--project_only", action="store_true",
                   help="with --project_nsamples: project from the rows in --out measured on "
                        "--source (same GPU, no memory cap) instead of running")
    p.add_argument("--source", default=None,
                   help="with --project_only: the source hash (16 hex digits) of the rows to use")
    p.add_argument("--out", default=str(ROOT / "bench" / "scale" / "scale.csv"))
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks (GPUs) of one torchrun job on this host (liftquant.quantize.distributed)")
    args, extra = p.parse_known_args(argv)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args.nproc, sys.argv[1:] if argv is None else argv)
    from liftquant.util.log import setup_logging
    from liftquant.util.records import merge_csv_rows, merge_json_rows

    setup_logging()
    if args.project_only:
        return _project_only(args)
    import logging

    logging.getLogger("liftquant.calibrate").setLevel(logging.DEBUG)  # per-phase times as they end
    if extra:
        print(f"passing to the pipeline: {' '.join(extra)}")
    extra += [f"--max_gpu_memory={args.max_gpu_memory}"] if args.max_gpu_memory else []
    extra += [f"--max_host_memory={args.max_host_memory}"] if args.max_host_memory else []
    result = run_one(args, extra)
    if result is None:  # a torchrun rank other than 0
        return 0
    row, detail = result
    out = Path(args.out)
    merge_csv_rows(out, [row], KEY)
    merge_json_rows(out.with_suffix(".json"), [detail], KEY)
    if args.project_nsamples:
        import csv

        rows = list(csv.DictReader(out.open()))
        same = [r for r in rows if r["source_sha256"] == row["source_sha256"]
                and r["gpu"] == row["gpu"] and r.get("max_gpu_memory", "") == ""]
        proj = project(same, args.shape, args.expc, args.project_nsamples)
        if proj:
            merge_csv_rows(out, [proj], KEY)
            print("projected:", json.dumps(proj))
    cols = ("shape", "lattice", "nsamples", "blocks_run", "blocks_total", "seconds_per_block",
            "total_seconds", "projected", "peak_gpu_gib", "peak_host_gib", "cache_mode")
    print(" | ".join(cols))
    print(" | ".join(str(row[c]) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
