"""Block-wise LiftQuant calibration (paper §3-4): the pipeline behind ``main.py``.

For each decoder block, in order:

1. FP targets ``Y = block(X)`` (and per-channel ``mean |x|`` of every linear group's input,
   gathered by hooks in the same pass: the AWQ-like ``s1`` initialisation);
2. the group linears become :class:`~liftquant.linear.LiftLinear` in proxy mode; stage 1 trains
   the whitening T (P1, P2, s1, s2) and proxy clips on block-output MSE (Eq. 3);
3. every layer is rounded to the lattice (``round_to_lattice``); stage 2 (intra-block
   correction, Eq. 5) trains latent signs, scales, the fused T* factors and s1/s2;
4. the layers are packed into :class:`~liftquant.linear.PackedLiftLinear` and the next block's
   inputs are propagated: ``fp`` (inputs of block i+1 are FP outputs, the authors' default) or
   ``quantized`` (outputs of the quantized block; targets are then the FP block applied to
   those inputs).

Finished blocks are written to ``<blocks_dir>/block_XXX.safetensors`` (+ ``.json`` report row)
as they finish; ``resume`` reloads them and only re-propagates activations, and every block is
seeded with ``seed + index``, so a resumed run produces the same checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from liftquant.blockstore import block_file, is_finished, load_finished_block, save_block
from liftquant.cache import ActivationCache, choose_mode
from liftquant.capture import capture_block_inputs, prepare_block_kwargs
from liftquant.config import RunConfig
from liftquant.lattice import LatticeSpec
from liftquant.linear import LiftLinear, cast_unquantized, lifted_width
from liftquant.log import get_logger, peak_memory_gib, seed_everything
from liftquant.models.adapters import ModelAdapter

logger = get_logger("calibrate")

# s1 = (mean|x| / geometric mean)^alpha, clamped to this range (SPEC §3: AWQ-like init).
S1_CLAMP = (1.0 / 16.0, 16.0)
# Consecutive non-finite losses tolerated before training stops with an error.
MAX_NONFINITE = 3
# Gradient-norm clip for block training.
GRAD_CLIP = 1.0
# Samples used for the per-channel activation statistics (s1 init).
STATS_SAMPLES = 64


@dataclass
class BlockData:
    """What ``train_block`` needs: activations, replay kwargs, split and device."""

    inputs: ActivationCache
    targets: ActivationCache
    block_kwargs: dict[str, Any]
    train_idx: list[int]
    holdout_idx: list[int]
    device: torch.device


# ------------------------------------------------------------------------------- training
def _forward(block: nn.Module, x: Tensor, kwargs: dict) -> Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def holdout_error(block: nn.Module, data: BlockData, *, batch_size: int) -> float:
    """Relative output MSE ``||block(X) - Y||^2 / ||Y||^2`` on the held-out samples."""
    num = den = 0.0
    for i in range(0, len(data.holdout_idx), batch_size):
        idx = data.holdout_idx[i:i + batch_size]
        x = data.inputs.get_batch(idx, data.device).float()
        y = data.targets.get_batch(idx, data.device).float()
        kw = prepare_block_kwargs(data.block_kwargs, batch=len(idx), device=data.device,
                                  dtype=torch.float32)
        num += float((_forward(block, x, kw) - y).square().sum())
        den += float(y.square().sum())
    return num / max(den, 1e-30)


def train_block(
    block: nn.Module,
    data: BlockData,
    *,
    param_groups: list[dict],
    epochs: int,
    batch_size: int,
    n_samples: int,
    seed: int,
) -> dict[str, float]:
    """Minimise block-output MSE vs targets over ``param_groups`` (Adam, one cosine schedule).

    Returns the first and last epoch's mean training loss. Non-finite losses are skipped with a
    warning; ``MAX_NONFINITE`` in a row raise ``FloatingPointError``.
    """
    groups = [g for g in param_groups if g["params"] and g["lr"] > 0]
    train_idx = data.train_idx[:n_samples]
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    total = epochs * steps_per_epoch
    if not groups or total == 0:
        return {"loss_first": float("nan"), "loss_last": float("nan")}
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    params = [p for g in groups for p in g["params"]]
    epoch_losses, bad = [], 0
    for _ in range(epochs):
        order = torch.randperm(len(train_idx), generator=gen).tolist()
        losses = []
        for s in range(steps_per_epoch):
            idx = [train_idx[j] for j in order[s * batch_size:(s + 1) * batch_size]]
            x = data.inputs.get_batch(idx, data.device).float()
            y = data.targets.get_batch(idx, data.device).float()
            kw = prepare_block_kwargs(data.block_kwargs, batch=len(idx), device=data.device,
                                      dtype=torch.float32)
            loss = (_forward(block, x, kw) - y).square().mean()
            if not torch.isfinite(loss):
                bad += 1
                logger.warning("non-finite block loss (%d in a row); step skipped", bad)
                if bad >= MAX_NONFINITE:
                    raise FloatingPointError(
                        "block training produced non-finite losses; lower the learning rates "
                        "(--lt_lr/--la_lr/--lexw_lr) or check the FP model for inf/NaN")
                opt.zero_grad(set_to_none=True)
                continue
            bad = 0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        epoch_losses.append(sum(losses) / max(1, len(losses)))
    return {"loss_first": epoch_losses[0], "loss_last": epoch_losses[-1]}


# ------------------------------------------------------------------------------- one block
@torch.no_grad()
def fp_targets_and_stats(
    block: nn.Module, adapter: ModelAdapter, data: BlockData, *, batch_size: int, fill: bool
) -> dict[str, Tensor]:
    """Write ``targets = block(inputs)`` (when ``fill``) and return mean |x| per group input."""
    groups = adapter.block_groups(block)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    seen = {"n": 0}
    handles = []
    for group in groups:
        first = group[0]

        def hook(_m, args, _name=first):
            if seen["n"] >= STATS_SAMPLES:
                return
            a = args[0].detach().float().abs().reshape(-1, args[0].shape[-1])
            sums[_name] = sums.get(_name, 0) + a.sum(0)
            counts[_name] = counts.get(_name, 0) + a.shape[0]

        handles.append(adapter.get_linear(block, first).register_forward_pre_hook(hook))
    try:
        n = len(data.inputs)
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            if not fill and seen["n"] >= STATS_SAMPLES:
                break
            x = data.inputs.get_batch(idx, data.device).float()
            kw = prepare_block_kwargs(data.block_kwargs, batch=len(idx), device=data.device,
                                      dtype=torch.float32)
            y = _forward(block, x, kw)
            seen["n"] += len(idx)
            if fill:
                data.targets[start:start + len(idx)] = y
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / counts[name] for name in sums}


def init_s1(mean_abs: Tensor, alpha: float) -> Tensor:
    """AWQ-like s1: ``(mean|x| / geometric mean)^alpha`` clamped to ``S1_CLAMP``."""
    m = mean_abs.clamp_min(1e-6)
    s = (m / m.log().mean().exp()).pow(alpha)
    return s.clamp(*S1_CLAMP)


def _to_lift(block, adapter, stats, spec, cfg) -> dict[str, LiftLinear]:
    layers = {}
    init = cfg.whiten.Rres_init.lower()
    for group in adapter.block_groups(block):
        s1 = init_s1(stats[group[0]], cfg.whiten.s1_alpha) if group[0] in stats else None
        for name in group:
            lin = adapter.get_linear(block, name)
            layer = LiftLinear.from_linear(lin, spec=spec, init=init,
                                           proxy_bits=cfg.lattice.wbits).to(lin.weight.device)
            if s1 is not None:
                layer.set_s1(s1.to(layer.weight.device))
            adapter.set_module(block, name, layer)
            layers[name] = layer
    return layers


def _groups_stage1(layers, cfg) -> list[dict]:
    t = cfg.train
    pick = lambda key: [p for l in layers.values() for p in l.stage1_parameters()[key]]  # noqa
    return [{"params": pick("transform"), "lr": t.lexw_lr},
            {"params": pick("s1s2"), "lr": t.la_lr},
            {"params": pick("clip"), "lr": t.lscale_lr}]


def _groups_stage2(layers, cfg) -> list[dict]:
    t = cfg.train
    pick = lambda key: [p for l in layers.values() for p in l.stage2_parameters()[key]]  # noqa
    return [{"params": pick("weight"), "lr": t.lw_lr if t.finetuning_weights else 0.0},
            {"params": pick("scale"), "lr": t.lscale_lr},
            {"params": pick("transform"), "lr": t.lt_lr},
            {"params": pick("s1s2"), "lr": t.la_lr}]


def quantize_block(
    block: nn.Module,
    *,
    adapter: ModelAdapter,
    data: BlockData,
    stats: dict[str, Tensor],
    M: Tensor,
    spec: LatticeSpec,
    cfg: RunConfig,
    seed: int,
) -> dict[str, Any]:
    """Stage 1, lattice rounding, stage 2 and packing of one block (on ``data.device``)."""
    bs = cfg.calib.batch_size
    for p in block.parameters():
        p.requires_grad_(False)
    layers = _to_lift(block, adapter, stats, spec, cfg)
    row: dict[str, Any] = {}
    s1 = train_block(block, data, param_groups=_groups_stage1(layers, cfg),
                     epochs=cfg.stage_epochs(1), batch_size=bs, n_samples=cfg.stage_nsamples(1),
                     seed=seed)
    row["stage1"] = s1
    row["holdout_proxy"] = holdout_error(block, data, batch_size=bs)
    rel = [layer.round_to_lattice(M.to(data.device), method=cfg.lattice.search)["rel_weight_err"]
           for layer in layers.values()]
    row["weight_rel_err"] = sum(rel) / len(rel)
    row["holdout_rounded"] = holdout_error(block, data, batch_size=bs)
    s2 = train_block(block, data, param_groups=_groups_stage2(layers, cfg),
                     epochs=cfg.stage_epochs(2), batch_size=bs, n_samples=cfg.stage_nsamples(2),
                     seed=seed + 1)
    row["stage2"] = s2
    row["holdout_corrected"] = holdout_error(block, data, batch_size=bs)
    for name, layer in layers.items():
        packed = layer.pack()
        packed.backend = cfg.run.backend
        adapter.set_module(block, name, packed)
    row["holdout_packed"] = holdout_error(block, data, batch_size=bs)
    return row


# ------------------------------------------------------------------------------- model loop
def _propagate_quantized(block, data: BlockData, bs: int) -> None:
    with torch.no_grad():
        for start in range(0, len(data.inputs), bs):
            idx = list(range(start, min(len(data.inputs), start + bs)))
            x = data.inputs.get_batch(idx, data.device).float()
            kw = prepare_block_kwargs(data.block_kwargs, batch=len(idx), device=data.device,
                                      dtype=torch.float32)
            data.inputs[start:start + len(idx)] = _forward(block, x, kw)


def quantize_model(
    model: nn.Module,
    calib_ids: Tensor,
    *,
    cfg: RunConfig,
    M: Tensor,
    spec: LatticeSpec,
    adapter: ModelAdapter,
    device: torch.device,
    blocks_dir: Path | None = None,
    resume: bool = False,
    fingerprint: dict | None = None,
) -> list[dict]:
    """Quantize every decoder block of ``model`` in place; return one report row per block."""
    from tqdm.auto import tqdm

    n, seq_len = calib_ids.shape
    hidden = model.config.hidden_size
    model_dtype = next(model.parameters()).dtype
    cache_dtype = torch.float32 if model_dtype == torch.float32 else torch.bfloat16
    need = 2 * ActivationCache.estimate_bytes(n, seq_len, hidden, cache_dtype)
    mode = choose_mode(need) if cfg.calib.cache_mode == "auto" else cfg.calib.cache_mode
    logger.info("activation caches: 2 x %d x %d x %d %s = %.2f GiB host (%s mode)",
                n, seq_len, hidden, cache_dtype, need / 2**30, mode)
    X = ActivationCache(n, seq_len, hidden, dtype=cache_dtype, mode=mode, path=cfg.calib.cache_dir)
    Y = ActivationCache(n, seq_len, hidden, dtype=cache_dtype, mode=mode, path=cfg.calib.cache_dir)
    try:
        kwargs = capture_block_inputs(model, adapter, calib_ids, cache=X,
                                      batch_size=cfg.calib.batch_size, device=device)
        logger.info("device memory estimate for one block in training: %.2f GiB",
                    estimate_block_train_bytes(adapter.get_blocks(model)[0], adapter, spec,
                                               tokens=cfg.calib.batch_size * seq_len) / 2**30)
        n_hold = cfg.train.holdout or max(1, n // 32)
        split = {"train_idx": list(range(n - n_hold)), "holdout_idx": list(range(n - n_hold, n))}
        blocks = adapter.get_blocks(model)
        rows = []
        for i in tqdm(range(len(blocks)), desc="blocks"):
            t0 = time.time()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seed_everything(cfg.calib.seed + i)
            block = blocks[i].to(device=device, dtype=torch.float32)
            data = BlockData(inputs=X, targets=Y, block_kwargs=kwargs, device=device, **split)
            path = block_file(blocks_dir, i)
            done = resume and is_finished(path)
            fill = cfg.train.propagate == "fp" or not done
            stats = fp_targets_and_stats(block, adapter, data, batch_size=cfg.calib.batch_size,
                                         fill=fill)
            if done:
                row = load_finished_block(block, path, adapter=adapter, spec=spec,
                                          backend=cfg.run.backend, device=device,
                                          fingerprint=fingerprint)
                logger.info("block %d/%d resumed from %s", i + 1, len(blocks), path)
            else:
                row = {"block": i, **quantize_block(
                    block, adapter=adapter, data=data, stats=stats, M=M, spec=spec, cfg=cfg,
                    seed=cfg.calib.seed + i)}
                row["seconds"] = round(time.time() - t0, 2)
                row["peak_gib"] = round(peak_memory_gib(device), 3)
                _log_row(row, len(blocks))
            if cfg.train.propagate == "fp":
                X, Y = Y, X  # FP outputs of block i are the inputs of block i + 1
            else:
                _propagate_quantized(block, data, cfg.calib.batch_size)
            cast_unquantized(block, model_dtype)
            blocks[i] = block.to("cpu")
            if path is not None and not done:
                save_block(path, blocks[i], row, fingerprint=fingerprint)
            rows.append(row)
    finally:  # disk-backed caches delete their files here, also on errors
        X.close()
        Y.close()
    return rows


def estimate_block_train_bytes(block: nn.Module, adapter: ModelAdapter, spec: LatticeSpec,
                               *, tokens: int) -> int:
    """Rough fp32 footprint of stage-2 training of one block: parameters, latent signs with
    their gradient and Adam moments, and activations kept for backward (tokens per step)."""
    params = sum(p.numel() for p in block.parameters())
    latents, acts = 0, 0
    for name in adapter.linear_names(block):
        lin = adapter.get_linear(block, name)
        k = lifted_width(lin.in_features, spec)
        latents += lin.out_features * k
        acts += tokens * (lin.in_features + k + lin.out_features)
    return 4 * (params + 4 * latents + 2 * acts)


def _log_row(row: dict, n_blocks: int) -> None:
    logger.info(
        "block %d/%d stage1 loss %.3e->%.3e | rounded %.4f stage2 loss %.3e->%.3e "
        "holdout_rel_mse %.4f (packed %.4f) %.1fs peak %.2f GiB",
        row["block"] + 1, n_blocks, row["stage1"]["loss_first"], row["stage1"]["loss_last"],
        row["holdout_rounded"], row["stage2"]["loss_first"], row["stage2"]["loss_last"],
        row["holdout_corrected"], row["holdout_packed"], row["seconds"], row["peak_gib"])
