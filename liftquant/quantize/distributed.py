"""Blocks in parallel across processes: ``torchrun --nproc_per_node N main.py ...`` (issue 18).

With ``--propagate fp`` (the authors' default, ``--use_fpinps``) block i trains on the FP
model's inputs and targets, so blocks are independent jobs once their FP inputs exist. Design:

* **FP inputs.** Every rank captures the embedding outputs and runs the FP blocks forward up
  to the last block it owns (:func:`liftquant.quantize.calibrate.quantize_model` with ``only_blocks``).
  No activations cross processes; the cost is that rank r repeats the FP passes of the blocks
  before its own (one forward pass over the calibration set each, against roughly
  ``1 + 3 * (stage-1 + stage-2 epochs)`` passes to quantize a block) and that every rank holds
  the FP model and two activation caches in host memory (``--cache_mode disk`` and
  ``--max_host_memory``, which is per process, bound the latter).
* **Assignment** (:func:`assign_blocks`): contiguous ranges, chosen to minimise the estimated
  finishing time of the slowest rank, which counts the repeated FP passes (a rank owning late
  blocks gets fewer of them). Cost of a block: the weight count of its quantized linears
  (FLOPs per token), times the passes above; blocks already finished (``--resume``) cost only
  their FP pass. Deterministic; rank 0 computes it and broadcasts it.
* **Results** travel through the per-block files of :mod:`liftquant.quantize.blockstore` (which
  ``--resume`` needs anyway): each rank writes its blocks, the ranks exchange a status (gloo,
  CPU), then rank 0 loads the other ranks' blocks exactly as a resumed run does and writes the
  one checkpoint and ``report.json``. Only small control messages go through the process group.
* **Bit-identity.** Every block is seeded from ``seed + index`` alone (``seed_everything`` and
  the stage generators, :mod:`liftquant.quantize.calibrate`) and its FP inputs are computed by the same
  code on the same device type, so the checkpoint equals a one-process run's tensor for tensor
  (tested on CPU with gloo). On CUDA this holds as far as a one-GPU run repeats itself
  (kernels with atomics break both), and while no rank shrinks its memory plan after running
  out of memory at a block where the one-process run did not.

NVLink multicast is forced off before the process group starts (:data:`MULTICAST_OFF`).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import os
import re
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from liftquant.cli.config import RunConfig
from liftquant.core.lattice import LatticeSpec
from liftquant.core.linear import cast_unquantized
from liftquant.models.adapters import ModelAdapter
from liftquant.quantize.blockstore import block_file, is_finished, load_finished_block
from liftquant.util.log import get_logger

logger = get_logger("distributed")

#: Forced in every launch (issue 18: NVLink multicast stays off), whatever the user set.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
#: How long a rank may wait for the others (the status exchange after the last block): the
#: slowest rank's surplus, hours at 70B. A dead rank ends the job sooner through torchrun.
WAIT_TIMEOUT = timedelta(hours=72)
#: Forward-pass equivalents of one training sample (forward + backward).
STEP_FORWARDS = 3.0
#: Held-out error passes per block (proxy, rounded, corrected, packed).
HOLDOUT_PASSES = 4
#: Test hook: ``"RANK:N"`` makes that rank exit with :data:`FAULT_EXIT` right after it saved
#: its N-th block (a rank dying mid-run; tests/test_distributed.py). Unset in real runs.
FAULT_ENV = "LIFTQUANT_TEST_FAULT"
FAULT_EXIT = 17


class RankFailed(ChildProcessError):
    """Another process of the torchrun job failed; its finished block files are kept, so
    ``--resume`` continues the run (an ``OSError`` so the CLI reports it in one line)."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int = 1  # ranks on this host (they share its RAM)
    backend: str = ""
    env_overrides: tuple[str, ...] = ()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(environ: Mapping[str, str] = os.environ) -> DistContext | None:
    """The job torchrun describes in ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; None when this is
    a plain one-process launch (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``)."""
    raw = environ.get("WORLD_SIZE", "").strip()
    if not raw or raw == "1":
        return None
    try:
        world = int(raw)
        rank = int(environ["RANK"])
        local = int(environ.get("LOCAL_RANK", rank))
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
    except (KeyError, ValueError):
        raise ValueError(f"WORLD_SIZE={raw} but RANK={environ.get('RANK')!r}: launch with "
                         "torchrun --nproc_per_node N main.py ..., or unset WORLD_SIZE for "
                         "one process") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} with WORLD_SIZE={world}: launch with torchrun "
                         "--nproc_per_node N main.py ...")
    return DistContext(rank=rank, world_size=world, local_rank=local,
                       local_world_size=max(1, local_world))


def check_supported(cfg: RunConfig) -> None:
    """Refuse, before any process group starts, what cannot be split across ranks."""
    if cfg.train.propagate != "fp":
        raise ValueError("--propagate quantized is sequential (block i+1 trains on the outputs "
                         "of quantized block i) and is refused under torchrun: use "
                         "--propagate fp (--use_fpinps, the authors' default) or launch one "
                         "process without torchrun")
    if cfg.lattice.method != "liftquant":
        raise ValueError(f"--method {cfg.lattice.method} runs in one process: launch it "
                         "without torchrun")
    if re.fullmatch(r"cuda:\d+", cfg.model.device):
        raise ValueError(f"--device {cfg.model.device} under torchrun: each rank uses "
                         "cuda:LOCAL_RANK; pass --device cuda (or auto)")


def force_multicast_off(environ: MutableMapping[str, str] = os.environ) -> tuple[str, ...]:
    """Set :data:`MULTICAST_OFF` in ``environ``; returns ``"NAME=old -> new"`` for every value
    the user had set otherwise (setdefault would keep a user's ``NCCL_NVLS_ENABLE=1``)."""
    changed = []
    for name, value in MULTICAST_OFF.items():
        old = environ.get(name)
        if old is not None and old != value:
            changed.append(f"{name}={old} -> {value}")
        environ[name] = value
    return tuple(changed)


def init(ctx: DistContext, *, cuda: bool) -> DistContext:
    """Start the process group: gloo for the (CPU) control messages, plus NCCL on CUDA with
    this rank's GPU ``cuda:LOCAL_RANK``. No tensor data is exchanged (see the module doc), so
    no NCCL watchdog runs while a rank waits hours for the others."""
    overrides = force_multicast_off()
    backend = "gloo"
    if cuda:
        if ctx.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={ctx.local_rank} but {torch.cuda.device_count()} "
                             "GPU(s) are visible: lower --nproc_per_node")
        torch.cuda.set_device(ctx.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=WAIT_TIMEOUT)
        atexit.register(shutdown)
    return dataclasses.replace(ctx, backend=backend, env_overrides=overrides)


def log_start(ctx: DistContext) -> None:
    """One line per rank: where it runs and the multicast settings (overrides as warnings)."""
    for change in ctx.env_overrides:
        logger.warning("rank %d: %s (NVLink multicast is kept off under torchrun)",
                       ctx.rank, change)
    logger.info("rank %d of %d (local rank %d), backend %s, %s", ctx.rank, ctx.world_size,
                ctx.local_rank, ctx.backend,
                ", ".join(f"{k}={os.environ.get(k)}" for k in MULTICAST_OFF))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def on_main(ctx: DistContext | None, fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 only (e.g. checking and writing ``--save_dir``) and raise its
    ``ValueError``/``OSError`` on every rank, so all ranks stop or go on together."""
    if ctx is None:
        fn()
        return
    error: list[BaseException | None] = [None]
    if ctx.is_main:
        try:
            fn()
        except (ValueError, OSError) as exc:
            error[0] = exc
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise error[0]


# ------------------------------------------------------------------------------- assignment
def block_costs(model: nn.Module, adapter: ModelAdapter, cfg: RunConfig, *, n_samples: int,
                finished: Sequence[int] = ()) -> tuple[list[float], list[float]]:
    """Estimated (FP pass, quantization beyond the FP pass) cost of every block, in weights
    of its quantized linears times passes over the calibration set (finished blocks: 0)."""
    n_hold = cfg.train.holdout or max(1, n_samples // 32)
    n_train = n_samples - n_hold
    train_passes = sum(STEP_FORWARDS * cfg.stage_epochs(s) * min(n_train, cfg.stage_nsamples(s))
                       for s in (1, 2)) / n_samples + HOLDOUT_PASSES * n_hold / n_samples
    fp, quant = [], []
    for i, block in enumerate(adapter.get_blocks(model)):
        weights = sum(adapter.get_linear(block, name).in_features *
                      adapter.get_linear(block, name).out_features
                      for name in adapter.linear_names(block))
        fp.append(float(weights))
        quant.append(0.0 if i in set(finished) else weights * train_passes)
    return fp, quant


def assign_blocks(fp_cost: Sequence[float], quant_cost: Sequence[float],
                  world_size: int) -> list[list[int]]:
    """Contiguous block ranges, one per rank, minimising the slowest rank's estimated time.

    Rank r owning blocks ``[a, b)`` runs the FP passes of blocks ``< b`` and quantizes its own:
    time ``F(b) + Q(a, b)`` (``F`` prefix sum of ``fp_cost``, ``Q`` the range sum of
    ``quant_cost``). For a time limit, giving each rank in turn the longest range that meets it
    is optimal (a later start only shortens the next range), so the smallest feasible limit
    among the O(blocks^2) range times is found by bisection. Ranks left over own no blocks.
    """
    n = len(fp_cost)
    if world_size < 1:
        raise ValueError(f"world size {world_size}: must be >= 1")
    F, Q = [0.0], [0.0]
    for f, q in zip(fp_cost, quant_cost, strict=True):
        if f < 0 or q < 0:
            raise ValueError("block costs must be >= 0")
        F.append(F[-1] + f)
        Q.append(Q[-1] + q)

    def finish(a: int, b: int) -> float:
        return F[b] + Q[b] - Q[a]

    def split(limit: float) -> list[int] | None:
        bounds = [0]
        for _ in range(world_size):
            a = b = bounds[-1]
            while b < n and finish(a, b + 1) <= limit:
                b += 1
            bounds.append(b)
        return bounds if bounds[-1] == n else None

    limits = sorted({finish(a, b) for a in range(n) for b in range(a + 1, n + 1)}) or [0.0]
    lo, hi = 0, len(limits) - 1  # limits[-1] (one rank does everything) is always feasible
    while lo < hi:
        mid = (lo + hi) // 2
        if split(limits[mid]) is None:
            lo = mid + 1
        else:
            hi = mid
    bounds = split(limits[lo])
    assert bounds is not None
    return [list(range(bounds[r], bounds[r + 1])) for r in range(world_size)]


def rank_time(fp_cost: Sequence[float], quant_cost: Sequence[float],
              blocks: Sequence[int]) -> float:
    """Estimated time of a rank owning ``blocks``: FP passes up to its last block plus the
    quantization of its own."""
    if not blocks:
        return 0.0
    return sum(fp_cost[:max(blocks) + 1]) + sum(quant_cost[i] for i in blocks)


# ------------------------------------------------------------------------------- block loop
def per_rank_host_budget(cfg: RunConfig, ctx: DistContext) -> RunConfig:
    """``cfg`` with the activation-cache RAM budget split between the ranks of this host.

    Without ``--max_host_memory`` each process would allow itself the default share of the
    free RAM (:data:`liftquant.quantize.cache.DEFAULT_BUDGET_FRACTION`), so N ranks would plan N times
    that; the share is divided by the ranks per host instead. The cache mode does not change
    results and is not part of the resume fingerprint."""
    from liftquant.quantize.cache import DEFAULT_BUDGET_FRACTION, available_host_bytes
    from liftquant.quantize.plan import GIB

    if cfg.calib.max_host_memory is not None or ctx.local_world_size <= 1:
        return cfg
    out = copy.deepcopy(cfg)
    share = DEFAULT_BUDGET_FRACTION * available_host_bytes() / ctx.local_world_size
    out.calib.max_host_memory = share / GIB
    logger.info("rank %d: activation caches may use %.1f GiB of host RAM (the default share "
                "split between %d ranks on this host; --max_host_memory sets it)", ctx.rank,
                out.calib.max_host_memory, ctx.local_world_size)
    return out


def _fault_hook(rank: int) -> Callable[[int], None] | None:
    """The :data:`FAULT_ENV` test hook for this rank, or None."""
    raw = os.environ.get(FAULT_ENV)
    if not raw:
        return None
    target, after = (int(x) for x in raw.split(":"))
    if target != rank:
        return None
    saved = []

    def hook(i: int) -> None:
        saved.append(i)
        if len(saved) >= after:
            logger.error("rank %d: %s=%s, exiting after block %d", rank, FAULT_ENV, raw, i + 1)
            os._exit(FAULT_EXIT)

    return hook


def _plan_on_main(ctx: DistContext, model: nn.Module, adapter: ModelAdapter, cfg: RunConfig,
                  *, n_samples: int, blocks_dir: Path | None) -> dict:
    """Rank 0 finds the finished blocks (``is_finished`` deletes broken files, which must not
    race), estimates the costs and assigns the blocks; every rank receives the same plan."""
    box: list[dict | None] = [None]
    if ctx.is_main:
        n_blocks = len(adapter.get_blocks(model))
        finished = [i for i in range(n_blocks)
                    if cfg.run.resume and is_finished(block_file(blocks_dir, i))]
        fp, quant = block_costs(model, adapter, cfg, n_samples=n_samples, finished=finished)
        box[0] = {"finished": finished, "fp_cost": fp, "quant_cost": quant,
                  "assignment": assign_blocks(fp, quant, ctx.world_size)}
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _exchange_status(ctx: DistContext, error: str | None, blocks_dir: Path) -> None:
    """Every rank's outcome to every rank; raise :class:`RankFailed` if another one failed."""
    status: list[str | None] = [None] * ctx.world_size
    dist.all_gather_object(status, error)
    failed = [f"rank {r}: {e}" for r, e in enumerate(status) if e is not None and r != ctx.rank]
    if failed and error is None:
        raise RankFailed(f"{'; '.join(failed)}. Finished blocks are kept in {blocks_dir}; "
                         "fix the cause and rerun the same command with --resume")


def quantize_model_distributed(
    model: nn.Module,
    calib_ids: Tensor,
    *,
    ctx: DistContext,
    cfg: RunConfig,
    M: Tensor,
    spec: LatticeSpec,
    adapter: ModelAdapter,
    device: torch.device,
    blocks_dir: Path,
    fingerprint: dict | None,
) -> tuple[list[dict], dict]:
    """This rank's share of :func:`~liftquant.quantize.calibrate.quantize_model`; on rank 0 the model is
    then complete (the other ranks' blocks loaded from their files) and all report rows are
    returned, elsewhere only this rank's. Also returns the assignment summary."""
    from liftquant.quantize.calibrate import quantize_model
    from liftquant.util.errors import one_line

    n_blocks = len(adapter.get_blocks(model))
    plan = _plan_on_main(ctx, model, adapter, cfg, n_samples=calib_ids.shape[0],
                         blocks_dir=blocks_dir)
    finished, assignment = plan["finished"], plan["assignment"]
    fp_cost, quant_cost = plan["fp_cost"], plan["quant_cost"]
    own = assignment[ctx.rank]
    slowest = max(rank_time(fp_cost, quant_cost, blocks) for blocks in assignment)
    speedup = (sum(fp_cost) + sum(quant_cost)) / slowest if slowest > 0 else 1.0
    info = {"world_size": ctx.world_size, "backend": ctx.backend, "assignment": assignment,
            "finished_before": finished, "estimated_speedup": round(speedup, 3)}
    logger.info("rank %d quantizes blocks %s of %d (%d already finished); estimated speed-up "
                "%.2fx over one process", ctx.rank, _ranges(own), n_blocks, len(finished),
                speedup)
    rows, error = [], None
    try:
        if own:
            rows = quantize_model(model, calib_ids, cfg=per_rank_host_budget(cfg, ctx), M=M,
                                  spec=spec, adapter=adapter, device=device,
                                  blocks_dir=blocks_dir, resume=cfg.run.resume,
                                  fingerprint=fingerprint, only_blocks=own,
                                  on_block_saved=_fault_hook(ctx.rank))
    except Exception as exc:
        error = f"{type(exc).__name__}: {one_line(exc)}"
        _exchange_status(ctx, error, blocks_dir)
        raise
    _exchange_status(ctx, None, blocks_dir)
    owner = {i: r for r, blocks in enumerate(assignment) for i in blocks}
    if ctx.is_main:
        rows = _gather(model, rows, own=own, adapter=adapter, spec=spec, cfg=cfg,
                       blocks_dir=blocks_dir, fingerprint=fingerprint)
    for row in rows:
        row["rank"] = owner[row["block"]]
    return rows, info


def _gather(model: nn.Module, rows: list[dict], *, own: Sequence[int], adapter: ModelAdapter,
            spec: LatticeSpec, cfg: RunConfig, blocks_dir: Path, fingerprint: dict | None
            ) -> list[dict]:
    """Rank 0: load every block another rank quantized, as ``--resume`` does; all rows."""
    model_dtype = next(model.parameters()).dtype
    blocks = adapter.get_blocks(model)
    by_block = {row["block"]: row for row in rows}
    for i in range(len(blocks)):
        if i in own:
            continue
        path = block_file(blocks_dir, i)
        if not is_finished(path):
            raise RankFailed(f"block {i} has no intact file {path} although every rank "
                             "reported success; rerun the same command with --resume")
        row = load_finished_block(blocks[i], path, adapter=adapter, spec=spec,
                                  backend=cfg.run.backend, device=torch.device("cpu"),
                                  fingerprint=fingerprint)
        cast_unquantized(blocks[i], model_dtype)
        by_block[i] = {**row, "block": i}
    logger.info("rank 0 gathered %d block(s) of the other ranks from %s",
                len(blocks) - len(own), blocks_dir)
    return [by_block[i] for i in range(len(blocks))]


def _ranges(blocks: Sequence[int]) -> str:
    """``[4, 5, 6]`` -> ``"5-7"``, ``[4]`` -> ``"5"`` (1-based, as the block log lines count)."""
    if not blocks:
        return "none"
    return str(blocks[0] + 1) if len(blocks) == 1 else f"{blocks[0] + 1}-{blocks[-1] + 1}"
