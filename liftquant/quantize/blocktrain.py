"""Block-output training (paper Eq. 3 for stage 1, Eq. 5 for stage 2) and held-out errors.

``train_block`` minimises ``mean((block(X) - Y)^2)`` over the given parameter groups with Adam
and one cosine schedule, on batches streamed from the activation caches
(:class:`~liftquant.quantize.stream.BlockStream`). It is the fast form of the reference float32 loop:

* compute runs under ``torch.autocast`` in ``data.compute_dtype`` (bfloat16 on CUDA) while every
  trained tensor stays a float32 master copy; with ``float32`` it is the reference loop;
* a batch may be split into micro-batches (gradient accumulation, same mean loss) to fit a
  memory cap (:mod:`liftquant.quantize.plan`);
* global gradient-norm clipping includes the full straight-through latent gradients of the
  lattice-mode layers, whose flip candidates alone are trained (:mod:`liftquant.core.linear`).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from liftquant.core.linear import LiftLinear, flip_margin, supplied_factors
from liftquant.quantize.cache import ActivationCache
from liftquant.quantize.stream import BlockStream, forward_block, index_batches
from liftquant.util.log import get_logger

logger = get_logger("blocktrain")

# Stage 1: form the Cayley factors of a block's layers in one batched solve per factor size
# (core.linear.supplied_factors). None: on CUDA, where each small solve costs launches and
# dispatch; the CPU keeps the per-layer solves (the reference; little to save there).
BATCH_FACTORS: bool | None = None

# Consecutive non-finite losses tolerated before training stops with an error.
MAX_NONFINITE = 3
# Gradient-norm clip for block training.
GRAD_CLIP = 1.0
# Adam betas of block training (also used to bound how far a latent weight can move).
ADAM_BETAS = (0.9, 0.999)


@dataclass
class BlockData:
    """What ``train_block`` needs: activations, the stream over them, split and compute dtype."""

    inputs: ActivationCache
    targets: ActivationCache
    stream: BlockStream
    train_idx: list[int]
    holdout_idx: list[int]
    device: torch.device
    compute_dtype: torch.dtype = torch.float32
    micro_batch: int | None = None  # samples per forward; None: the whole batch
    deterministic: bool = True  # deterministic kernels on CUDA (same seed -> same checkpoint)

    def autocast(self):
        """Autocast context of the compute dtype (a no-op for float32)."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)


class OutOfMemoryBeforeStep(RuntimeError):
    """The accelerator ran out of memory before the first optimizer step of a stage (the
    parameters are untouched, so the caller may retry with a smaller memory plan)."""


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# cuBLAS needs a fixed workspace layout for reproducible matmuls under deterministic mode.
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


class _Deterministic:
    """``torch.use_deterministic_algorithms(True)`` for the duration of one training stage.

    On CUDA the backward passes of attention (flash / memory-efficient SDPA) and some reductions
    otherwise accumulate with atomics, so two runs with the same seed give different checkpoints.
    Strict mode makes them pick their deterministic kernels. An op with no deterministic kernel
    raises at its first use, i.e. in the first step of the stage, before any parameter moved:
    the stage then continues without it and says so once (:meth:`give_up`).
    """

    warned = False

    def __init__(self, enabled: bool):
        self.active = enabled
        self._prev = (torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled())

    def __enter__(self):
        if self.active:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
            torch.use_deterministic_algorithms(True)
        return self

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self._prev[0], warn_only=self._prev[1])
        return False

    def give_up(self, exc: BaseException) -> None:
        self.active = False
        torch.use_deterministic_algorithms(self._prev[0], warn_only=self._prev[1])
        if not _Deterministic.warned:
            _Deterministic.warned = True
            logger.warning("deterministic kernels unavailable (%s); training continues without "
                           "them, so two runs may differ in the last bits (--deterministic False "
                           "silences this)", str(exc).split("\n")[0][:200])


def _is_determinism_error(exc: BaseException) -> bool:
    text = str(exc)
    return "deterministic" in text and ("use_deterministic_algorithms" in text
                                        or "CUBLAS_WORKSPACE_CONFIG" in text)


def _micro_splits(n: int, micro: int | None) -> list[slice]:
    step = n if not micro else max(1, min(micro, n))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


@torch.no_grad()
def holdout_error(block: nn.Module, data: BlockData, *, batch_size: int) -> float:
    """Relative output MSE ``||block(X) - Y||^2 / ||Y||^2`` on the held-out samples."""
    num = torch.zeros((), dtype=torch.float64, device=data.device)
    den = torch.zeros((), dtype=torch.float64, device=data.device)
    bs = min(batch_size, data.micro_batch or batch_size)
    for idx, (x, y) in data.stream.batches(index_batches(data.holdout_idx, bs), data.inputs,
                                           data.targets):
        with data.autocast():
            out = forward_block(block, x, data.stream.kwargs(len(idx)))
        num += (out.float() - y.float()).square().sum(dtype=torch.float64)
        den += y.float().square().sum(dtype=torch.float64)
    return float(num / den.clamp_min(1e-30))


def cosine_lrs(lr: float, total: int) -> list[float]:
    """Per-step learning rates of the cosine schedule used by :func:`train_block`."""
    return [lr * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)) for s in range(total)]


def stage_steps(n_train: int, *, epochs: int, batch_size: int) -> int:
    """Optimizer steps of one stage over ``n_train`` samples."""
    return epochs * math.ceil(n_train / batch_size) if n_train > 0 else 0


def latent_flip_margin(lr: float, *, n_train: int, epochs: int, batch_size: int) -> float:
    """Largest move of a latent weight in stage 2 (0 when latents are not trained)."""
    if lr <= 0:
        return 0.0
    total = stage_steps(n_train, epochs=epochs, batch_size=batch_size)
    return flip_margin(cosine_lrs(lr, total), ADAM_BETAS)


def _clip_(dense: list[Tensor], cands: list[Tensor], layers: list[LiftLinear]) -> None:
    """Global-norm clip to ``GRAD_CLIP`` of all gradients, the latents counted densely.

    ``torch.nn.utils.clip_grad_norm_`` on the dense formulation: ``coef = min(1, clip / (norm +
    1e-6))``; the candidates' gradients are entries of the dense latent gradients, whose squared
    norms the layers recorded in backward.
    """
    grads = [p.grad for p in dense if p.grad is not None]
    sq = [n.square() for n in torch._foreach_norm(grads)] if grads else []
    sq += [s for s in (layer.pop_latent_sqnorm() for layer in layers) if s is not None]
    if not sq:
        return
    norm = torch.stack([s.float() for s in sq]).sum().sqrt()
    coef = (GRAD_CLIP / (norm + 1e-6)).clamp(max=1.0)
    every = grads + [p.grad for p in cands if p.grad is not None]
    torch._foreach_mul_(every, coef)


def _prepare(block: nn.Module, param_groups: list[dict]):
    """Active groups, the optimizer's groups (no empty tensors), dense/candidate params and
    the lattice layers whose latent gradients count."""
    groups = [g for g in param_groups if g["params"] and g["lr"] > 0]
    active = {id(p) for g in groups for p in g["params"]}
    layers = [m for m in block.modules() if isinstance(m, LiftLinear) and m.mode == "lattice"]
    cand_ids = set()
    for layer in layers:
        layer.track_latent_grad = id(layer.cand) in active
        if layer.track_latent_grad:
            cand_ids.add(id(layer.cand))
    layers = [m for m in layers if m.track_latent_grad]
    opt_groups = [{**g, "params": [p for p in g["params"] if p.numel()]} for g in groups]
    opt_groups = [g for g in opt_groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    dense = [p for p in params if id(p) not in cand_ids]
    cands = [p for p in params if id(p) in cand_ids]
    return groups, opt_groups, dense, cands, layers


def _factor_layers(block: nn.Module) -> list[LiftLinear]:
    """Stage-1 layers whose Cayley factors one batched solve per step can form: every
    LiftLinear in proxy mode except MoE experts (their routed subset is batched by
    ``ExpertList`` itself; an unrouted expert must get no gradient)."""
    from liftquant.models.moe import ExpertList

    experts = {id(m) for e in block.modules() if isinstance(e, ExpertList) for m in e.modules()}
    return [m for m in block.modules()
            if isinstance(m, LiftLinear) and m.mode == "proxy" and id(m) not in experts]


def _step_loss(block, data: BlockData, x: Tensor, y: Tensor, layers,
               factor_layers: list[LiftLinear] | None = None) -> tuple[float, bool]:
    """Forward + backward of one batch in micro-batches; returns (mean loss, finite).

    ``factor_layers`` take their Cayley factors from one batched solve per micro-batch
    (``core.linear.supplied_factors``). The loss is read once per micro-batch, after its
    backward (a non-finite loss leaves gradients the caller discards)."""
    splits = _micro_splits(x.shape[0], data.micro_batch)
    for layer in layers:
        layer.accumulate_latent_grad = len(splits) > 1
    total, finite, denom = 0.0, True, y.numel()
    for sl in splits:
        xs, ys = x[sl], y[sl]
        with supplied_factors(factor_layers or []):
            with data.autocast():
                out = forward_block(block, xs, data.stream.kwargs(xs.shape[0]))
            loss = (out.float() - ys.float()).square().sum() / denom
            loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            finite = False
            break
        total += value
    return total, finite


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
    warning; ``MAX_NONFINITE`` in a row raise ``FloatingPointError``. Running out of accelerator
    memory before the first optimizer step raises :class:`OutOfMemoryBeforeStep`.
    """
    groups, opt_groups, dense, cands, layers = _prepare(block, param_groups)
    train_idx = data.train_idx[:n_samples]
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    total = epochs * steps_per_epoch
    if not groups or total == 0:
        return {"loss_first": float("nan"), "loss_last": float("nan")}
    # CUDA: the fused Adam (one kernel group per step instead of several launches per tensor)
    fused = data.device.type == "cuda"
    opt = torch.optim.Adam(opt_groups, betas=ADAM_BETAS, fused=fused) if opt_groups else None
    sched = None if opt is None else torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    batch = data.device.type == "cuda" if BATCH_FACTORS is None else BATCH_FACTORS
    factor_layers = _factor_layers(block) if batch else []
    with _Deterministic(data.deterministic and data.device.type == "cuda") as det:
        return _train_loop(block, data, opt, sched, gen, det, train_idx=train_idx,
                           epochs=epochs, batch_size=batch_size,
                           steps_per_epoch=steps_per_epoch, dense=dense, cands=cands,
                           layers=layers, factor_layers=factor_layers)


def _train_loop(block, data, opt, sched, gen, det, *, train_idx, epochs, batch_size,
                steps_per_epoch, dense, cands, layers, factor_layers) -> dict[str, float]:
    epoch_losses, bad, steps_done = [], 0, 0
    for _ in range(epochs):
        order = torch.randperm(len(train_idx), generator=gen).tolist()
        batches = [[train_idx[j] for j in order[s * batch_size:(s + 1) * batch_size]]
                   for s in range(steps_per_epoch)]
        losses = []
        for _idx, (x, y) in data.stream.batches(batches, data.inputs, data.targets):
            try:
                loss, finite = _step_loss(block, data, x, y, layers, factor_layers)
            except RuntimeError as exc:
                if steps_done == 0 and _is_oom(exc):
                    _reset_grads(dense + cands, layers)
                    raise OutOfMemoryBeforeStep(str(exc).split("\n")[0]) from None
                if not (steps_done == 0 and det.active and _is_determinism_error(exc)):
                    raise
                _reset_grads(dense + cands, layers)  # nothing has moved yet: redo the step
                det.give_up(exc)
                loss, finite = _step_loss(block, data, x, y, layers, factor_layers)
            if not finite:
                bad += 1
                logger.warning("non-finite block loss (%d in a row); step skipped", bad)
                _reset_grads(dense + cands, layers)
                if bad >= MAX_NONFINITE:
                    raise FloatingPointError(
                        "block training produced non-finite losses; lower the learning rates "
                        "(--lt_lr/--la_lr/--lexw_lr) or check the FP model for inf/NaN")
                continue
            bad = 0
            _clip_(dense, cands, layers)
            if opt is not None:
                opt.step()
                sched.step()
            _reset_grads(dense + cands, layers)
            steps_done += 1
            losses.append(loss)
        epoch_losses.append(sum(losses) / max(1, len(losses)))
    return {"loss_first": epoch_losses[0], "loss_last": epoch_losses[-1]}


def _reset_grads(params: list[Tensor], layers: list[LiftLinear]) -> None:
    for p in params:
        p.grad = None
    for layer in layers:
        layer.pop_latent_sqnorm()
