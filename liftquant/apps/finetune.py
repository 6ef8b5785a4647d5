"""End-to-end fine-tuning of the continuous parameters of a packed LiftQuant model (SPEC §5).

The sign codes stay bit-packed and frozen (``packed_signs``, uint8 buffers); the side tensors of
every ``PackedLiftLinear`` -- per-row ``scale``, ``s1``, the fused T* factors ``L``/``R`` (Eq. 4)
and ``s2_act`` -- become float32 ``nn.Parameter`` s under the same names (state-dict keys are
unchanged) and are trained jointly on the causal-LM cross-entropy. Everything else (embeddings,
norms, head, biases) is frozen. After training they are turned back into buffers of their
stored dtype, so the checkpoint format and ``load_quantized`` are unchanged.

Learning rates (the seed README): scales ``lr``, transforms ``lr * factor_t``, s1/s2
``lr * factor_a``. The authors warn it can lower perplexity and still hurt harder tasks, so it
is opt-in and perplexity and task accuracy are reported before and after.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from liftquant.cli.finetune_config import (  # noqa: F401 - re-exported (their former home)
    REPORT_NAME,
    RUN_NAME,
    E2EArgs,
    build_e2e_parser,
    format_report,
)
from liftquant.core.linear import PackedLiftLinear
from liftquant.util.log import get_logger, peak_memory_gib

logger = get_logger("finetune")

SIDE_NAMES = ("scale", "s1", "L", "R", "s2_act")  # continuous tensors of a packed layer
GROUP_OF = {"scale": "scales", "L": "transforms", "R": "transforms", "s1": "s1s2",
            "s2_act": "s1s2"}


def check_lattice(qc: dict[str, Any], expc: str | None, *, where: str | Path = "config.json"
                  ) -> None:
    """``--expc`` must name the checkpoint's lattice (codes cannot change lattice here) and,
    where a lattice of that name is shipped, be the matrix recorded as ``M_sha256``."""
    from liftquant.core.lattice import LatticeSpec
    from liftquant.io.checkpoint import checkpoint_lattice

    if expc is not None and LatticeSpec.parse(expc).name != qc["lattice"]:
        raise ValueError(f"--expc {expc} does not match the checkpoint's lattice "
                         f"{qc['lattice']}: fine-tuning keeps the codes, re-quantize instead")
    if expc is not None:
        checkpoint_lattice(qc, where=where, fix="drop --expc to fine-tune anyway (fine-tuning "
                           "keeps the codes and does not use M)")


# ----------------------------------------------------------------------- parameters
def make_trainable(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Side buffers of packed layers -> float32 Parameters in place; all else frozen.

    Returns ``{"scales": [...], "transforms": [L, R, ...], "s1s2": [s1, s2_act, ...]}``.
    """
    model.requires_grad_(False)
    groups: dict[str, list[nn.Parameter]] = {"scales": [], "transforms": [], "s1s2": []}
    for m in model.modules():
        if not isinstance(m, PackedLiftLinear):
            continue
        m.side_dtypes = {}
        for name in SIDE_NAMES:
            t = m._buffers.pop(name)
            m.side_dtypes[name] = t.dtype
            p = nn.Parameter(t.detach().float())
            m.register_parameter(name, p)
            groups[GROUP_OF[name]].append(p)
        m.backend = "torch"  # the reference decode is differentiable
    return groups


@torch.no_grad()
def freeze_packed(model: nn.Module, *, backend: str = "auto") -> None:
    """Inverse of :func:`make_trainable`: trained Parameters back to buffers of stored dtype."""
    for m in model.modules():
        if isinstance(m, PackedLiftLinear) and hasattr(m, "side_dtypes"):
            for name in SIDE_NAMES:
                p = m._parameters.pop(name)
                m.register_buffer(name, p.detach().to(m.side_dtypes[name]))
            del m.side_dtypes
            m.backend = backend


def optimizer_groups(groups: dict[str, list[nn.Parameter]], *, lr: float, factor_t: float,
                     factor_a: float) -> list[dict[str, Any]]:
    lrs = {"scales": lr, "transforms": lr * factor_t, "s1s2": lr * factor_a}
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


# ----------------------------------------------------------------------- training
def _lr_factor(step: int, total: int, kind: str) -> float:
    if kind == "constant" or total <= 1:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def _checkpointing(model: nn.Module, on: bool) -> bool:
    """Switch HF activation (gradient) checkpointing; False when the model has none."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    new = hasattr(model, "activation_checkpointing_enable")  # transformers >= 5 spelling
    if on:
        kwargs = {"use_reentrant": False}
        if new:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
    return True


def train(model: nn.Module, windows: torch.Tensor, cfg: E2EArgs, *, device: torch.device,
          groups: dict[str, list[nn.Parameter]], eval_fn=None) -> dict[str, Any]:
    """Adam on the causal-LM loss over ``windows`` (N, pt_context_len); returns the history."""
    params = [p for ps in groups.values() for p in ps]
    opt = torch.optim.AdamW(optimizer_groups(groups, lr=cfg.learning_rate, factor_t=cfg.factor_t,
                                             factor_a=cfg.factor_a), weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    n_batches = math.ceil(windows.shape[0] / bs)
    total_batches = max(1, round(n_batches * cfg.num_train_epochs))
    total_steps = math.ceil(total_batches / accum)
    autocast = cfg.bf16 and device.type == "cuda"
    if cfg.bf16 and not autocast:
        logger.info("--bf16 on %s: training computes in float32", device.type)
    checkpointing = cfg.gradient_checkpointing and _checkpointing(model, True)
    gen = torch.Generator().manual_seed(cfg.data_seed)
    order = torch.cat([torch.randperm(windows.shape[0], generator=gen)
                       for _ in range(math.ceil(cfg.num_train_epochs))])
    history, step, acc_loss, t0 = [], 0, 0.0, time.time()
    model.train()
    for b in range(total_batches):
        batch = windows[order[b * bs:(b + 1) * bs]].to(device)  # (bs, L)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        (loss / accum).backward()
        acc_loss += loss.item() / accum
        if (b + 1) % accum and b + 1 < total_batches:
            continue
        f = _lr_factor(step, total_steps, cfg.lr_scheduler_type)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * f
        gnorm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                 if cfg.max_grad_norm > 0 else torch.zeros(()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        history.append({"step": step, "loss": acc_loss, "grad_norm": float(gnorm),
                        "lr": base_lrs[0] * f})
        if step % max(1, cfg.logging_steps) == 0 or step == total_steps:
            logger.info("step %d/%d loss %.4f grad_norm %.3f", step, total_steps, acc_loss,
                        float(gnorm))
        if eval_fn is not None and cfg.eval_strategy == "steps" and cfg.eval_steps > 0 \
                and step % cfg.eval_steps == 0:
            history[-1]["ppl"] = eval_fn()
            model.train()
        acc_loss = 0.0
    if checkpointing:
        _checkpointing(model, False)
    model.eval()
    return {"steps": step, "gradient_checkpointing": checkpointing, "history": history, "seconds": round(time.time() - t0, 1),
            "tokens": int(total_batches * bs * windows.shape[1]),
            "compute": "bf16 autocast" if autocast else "float32"}


# ----------------------------------------------------------------------- evaluation
def evaluate(model, tok, cfg: E2EArgs, *, device: torch.device, ppl_ids) -> dict[str, Any]:
    """Perplexity (``--do_ppl_eval``) and lm-eval tasks (``--eval_tasks``, when installed)."""
    from liftquant.evaluation.eval import perplexity

    out: dict[str, Any] = {}
    if ppl_ids is not None:
        out["ppl"] = perplexity(model, ppl_ids, seq_len=cfg.eval_seqlen, device=device,
                                batch_size=cfg.eval_batch_size,
                                max_windows=cfg.eval_max_windows, progress=False)
    if cfg.tasks:
        from liftquant.evaluation.lmeval import evaluate_tasks

        try:
            out["tasks"] = evaluate_tasks(model, tok, cfg.tasks, device=device,
                                          batch_size=cfg.eval_batch_size,
                                          limit=cfg.tasks_limit)
        except ImportError as exc:
            logger.warning("skipping --eval_tasks: %s", exc)
            out["tasks_skipped"] = str(exc)
    return out


def _tokenizer(cfg: E2EArgs, tok):
    if tok is None and cfg.fp_model_path:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.fp_model_path)
    if tok is None:
        raise FileNotFoundError(f"{cfg.quant_model_path} has no tokenizer; give --fp_model_path")
    return tok


def _fp_perplexity(cfg: E2EArgs, ppl_ids, device) -> float:
    from liftquant.evaluation.eval import perplexity
    from liftquant.models.loading import load_fp_model

    fp, _ = load_fp_model(cfg.fp_model_path, dtype=torch.float32 if device.type == "cpu"
                          else torch.bfloat16)
    try:
        return perplexity(fp.to(device), ppl_ids, seq_len=cfg.eval_seqlen, device=device,
                          max_windows=cfg.eval_max_windows, progress=False)
    finally:
        del fp


def run_e2e(cfg: E2EArgs) -> dict[str, Any]:
    """Load -> evaluate -> train -> freeze -> evaluate -> save; returns the report."""
    from liftquant.apps.api import resolve_device
    from liftquant.evaluation.data import load_calibration, load_eval_tokens
    from liftquant.io.checkpoint import (
        bits_report,
        load_quantized,
        read_quantization_config,
        save_quantized,
    )
    from liftquant.quantize.calibrate import cast_unquantized
    from liftquant.util.provenance import provenance

    src, out_dir, device = Path(cfg.quant_model_path), Path(cfg.output_dir), \
        resolve_device(cfg.device)
    check_lattice(read_quantization_config(src), cfg.expc, where=src / "config.json")
    torch.manual_seed(cfg.data_seed)
    model, tok = load_quantized(src, device=device, trainable=True, backend=cfg.backend)
    tok, qc = _tokenizer(cfg, tok), dict(model.config.quantization_config)
    stored = model.get_input_embeddings().weight.dtype
    if device.type == "cpu" and stored != torch.float32:
        cast_unquantized(model, torch.float32)  # CPUs run bf16/fp16 matmuls slowly
    ppl_ids = load_eval_tokens(tok, source=cfg.eval_dataset) if cfg.eval_ppl else None
    prov = provenance(device=device)
    report: dict[str, Any] = {"lattice": qc["lattice"], "device": str(device),
                              "config": dataclasses.asdict(cfg), "git_sha": prov["commit_short"],
                              "provenance": prov}
    if ppl_ids is not None and cfg.fp_model_path:
        report["fp"] = {"ppl": _fp_perplexity(cfg, ppl_ids, device)}
    report["before"] = evaluate(model, tok, cfg, device=device, ppl_ids=ppl_ids)
    if not cfg.do_train:
        logger.info("--do_train not given: evaluation only, no checkpoint saved")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1, default=str))
        return report
    windows = load_calibration(tok, source=cfg.dataset, n_samples=cfg.max_train_samples,
                               seq_len=cfg.pt_context_len, seed=cfg.data_seed)  # (N, L)
    groups = make_trainable(model)
    eval_fn = (lambda: evaluate(model, tok, cfg, device=device, ppl_ids=ppl_ids).get("ppl")) \
        if ppl_ids is not None else None
    report["train"] = train(model, windows, cfg, device=device, groups=groups, eval_fn=eval_fn)
    report["train"]["trainable_params"] = sum(p.numel() for ps in groups.values() for p in ps)
    report["train"]["peak_gib"] = round(peak_memory_gib(device), 3)
    freeze_packed(model, backend=cfg.backend)
    report["after"] = evaluate(model, tok, cfg, device=device, ppl_ids=ppl_ids)
    cast_unquantized(model, stored)
    save_e2e(model, tok, src=src, out_dir=out_dir, qc=qc, report=report, cfg=cfg,
             save=save_quantized, bits=bits_report(model))
    return report


def save_e2e(model, tok, *, src: Path, out_dir: Path, qc, report, cfg: E2EArgs, save,
             bits) -> None:
    """Same checkpoint format; the quantization report and run config are carried over."""
    base = json.loads((src / "report.json").read_text()) if (src / "report.json").is_file() else {}
    full = {**base, "bits": bits, "e2e": report}
    run_cfg = json.loads((src / "liftquant_run.json").read_text()) \
        if (src / "liftquant_run.json").is_file() else None
    save(model.cpu(), tok, out_dir, qconfig=qc, report=full, run_config=run_cfg)
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1, default=str))
    (out_dir / RUN_NAME).write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    if src.resolve() != out_dir.resolve():
        for extra in src.glob("*.md"):
            shutil.copy2(extra, out_dir / extra.name)
