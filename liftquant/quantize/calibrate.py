"""Block-wise LiftQuant calibration (paper §3-4): the pipeline behind ``main.py``.

For each decoder block, in order:

1. FP targets ``Y = block(X)`` (and per-channel ``mean |x|`` of every linear group's input,
   gathered by hooks in the same pass: the AWQ-like ``s1`` initialisation);
2. the group linears become :class:`~liftquant.core.linear.LiftLinear` in proxy mode; stage 1 trains
   the whitening T (P1, P2, s1, s2) and proxy clips on block-output MSE (Eq. 3);
3. all linears of the block are rounded to the lattice in one batched search
   (:func:`round_block_to_lattice`); stage 2 (intra-block correction, Eq. 5) trains the flip
   candidates of the latent signs, scales, the fused T* factors and s1/s2;
4. the layers are packed into :class:`~liftquant.core.linear.PackedLiftLinear` and the next block's
   inputs are propagated: ``fp`` (inputs of block i+1 are FP outputs, the authors' default) or
   ``quantized`` (outputs of the quantized block; targets are then the FP block applied to
   those inputs).

Compute runs in ``--compute_dtype`` (bfloat16 autocast on CUDA, float32 masters of everything
trained); every pass over the activations goes through one :class:`~liftquant.quantize.stream.BlockStream`;
the memory plan (:mod:`liftquant.quantize.plan`) is logged before the first block and an ETA after each.
Finished blocks are written to ``<blocks_dir>/block_XXX.safetensors`` (+ ``.json`` report row,
:mod:`liftquant.quantize.blockstore`); ``resume`` reloads them and only re-propagates activations, and
every block is seeded with ``seed + index``, so a resumed run produces the same checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from liftquant.cli.config import RunConfig
from liftquant.core.lattice import LatticeSpec, encode_candidates
from liftquant.core.linear import LiftLinear, cast_unquantized
from liftquant.models.adapters import ModelAdapter
from liftquant.models.moe import experts_without_tokens, unfuse_experts
from liftquant.quantize.blockstore import block_file, is_finished, load_finished_block, save_block
from liftquant.quantize.blocktrain import (
    BlockData,
    OutOfMemoryBeforeStep,
    holdout_error,
    latent_flip_margin,
    train_block,
)
from liftquant.quantize.cache import ActivationCache, choose_mode
from liftquant.quantize.capture import capture_block_inputs, kwargs_for_block
from liftquant.quantize.plan import (
    GIB,
    MemoryPlan,
    cuda_index,
    gpu_budget_bytes,
    plan_block,
    shrink,
)
from liftquant.quantize.stream import BlockStream, forward_block, index_batches
from liftquant.util.log import get_logger, peak_memory_gib, seed_everything

logger = get_logger("calibrate")

# s1 = (mean|x| / geometric mean)^alpha, clamped to this range (SPEC §3: AWQ-like init).
S1_CLAMP = (1.0 / 16.0, 16.0)
# Samples used for the per-channel activation statistics (s1 init).
STATS_SAMPLES = 64
# Planning guess of the share of latent weights within the flip margin, per unit of margin
# (|pre| has a density of about this much near zero; measured after rounding and logged).
CANDIDATE_DENSITY = 1.0


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--compute_dtype``: auto = bfloat16 on CUDA (when supported), float32 elsewhere."""
    if name == "auto":
        ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


class _Clock:
    """Per-phase wall time of one block (synchronised on CUDA so phases do not blur)."""

    def __init__(self, device: torch.device, block: int = 0) -> None:
        self.device, self.split, self._t = device, {}, time.perf_counter()
        self.block = block

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.split[phase] = round(self.split.get(phase, 0.0) + now - self._t, 3)
        logger.debug("block %d %s %.2f s", self.block + 1, phase, now - self._t)
        self._t = now


# ------------------------------------------------------------------------------- one block
@torch.no_grad()
def fp_targets_and_stats(
    block: nn.Module, adapter: ModelAdapter, data: BlockData, *, batch_size: int, fill: bool
) -> dict[str, Tensor]:
    """Write ``targets = block(inputs)`` (when ``fill``) and return mean |x| per group input."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    seen = {"n": 0}
    handles = []
    for group in adapter.block_groups(block):

        def hook(_m, args, _name=group[0]):
            if seen["n"] >= STATS_SAMPLES:
                return
            a = args[0].detach().float().abs().reshape(-1, args[0].shape[-1])
            sums[_name] = sums.get(_name, 0) + a.sum(0)
            counts[_name] = counts.get(_name, 0) + a.shape[0]

        handles.append(adapter.get_linear(block, group[0]).register_forward_pre_hook(hook))
    n = len(data.inputs) if fill else min(len(data.inputs), STATS_SAMPLES)
    bs = min(batch_size, data.micro_batch or batch_size)
    try:
        with data.stream.writer(data.targets) as out:
            for idx, (x,) in data.stream.batches(index_batches(range(n), bs), data.inputs):
                with data.autocast():
                    y = forward_block(block, x, data.stream.kwargs(len(idx)))
                seen["n"] += len(idx)
                if fill:
                    out.put(idx, y)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / counts[name] for name in sums}


def init_s1(mean_abs: Tensor, alpha: float) -> Tensor:
    """AWQ-like s1: ``(mean|x| / geometric mean)^alpha`` clamped to ``S1_CLAMP``."""
    m = mean_abs.clamp_min(1e-6)
    s = (m / m.log().mean().exp()).pow(alpha)
    return s.clamp(*S1_CLAMP)


def compile_proxy_on(cfg: RunConfig, device: torch.device) -> bool:
    """``--compile_proxy`` as given, else on for CUDA (stage 1 faster on the 8B shape, measured
    in bench/scale/README.md) and off on the CPU (compiling costs more than a small model's
    whole block there). Unset without Triton (inductor's CUDA code generator): off."""
    if cfg.train.compile_proxy is not None:
        return cfg.train.compile_proxy
    if device.type != "cuda":
        return False
    from liftquant.kernels.search import HAS_TRITON

    return HAS_TRITON


def _to_lift(block, adapter, stats, spec, cfg, plan: MemoryPlan,
             lattices: dict[str, tuple[LatticeSpec, Tensor]] | None = None
             ) -> dict[str, LiftLinear]:
    """Group linears -> LiftLinear at ``spec``, or at ``lattices[name][0]`` when given."""
    layers = {}
    init = cfg.whiten.Rres_init.lower()
    compiled = compile_proxy_on(cfg, next(block.parameters()).device)
    for group in adapter.block_groups(block):
        s1 = init_s1(stats[group[0]], cfg.whiten.s1_alpha) if group[0] in stats else None
        for name in group:
            lin = adapter.get_linear(block, name)
            own = spec if lattices is None else lattices[name][0]
            layer = LiftLinear.from_linear(lin, spec=own, init=init,
                                           proxy_bits=cfg.lattice.wbits).to(lin.weight.device)
            layer.checkpoint_proxy = plan.checkpoint_proxy
            layer.cache_signs = plan.cache_signs
            layer.compile_proxy = compiled
            if s1 is not None:
                layer.set_s1(s1.to(layer.weight.device))
            adapter.set_module(block, name, layer)
            layers[name] = layer
    return layers


def _groups_stage1(layers, cfg) -> list[dict]:
    t = cfg.train
    pick = lambda key: [p for l in layers.values() for p in l.stage1_parameters()[key]]
    return [{"params": pick("transform"), "lr": t.lexw_lr},
            {"params": pick("s1s2"), "lr": t.la_lr},
            {"params": pick("clip"), "lr": t.lscale_lr}]


def _groups_stage2(layers, cfg) -> list[dict]:
    t = cfg.train
    pick = lambda key: [p for l in layers.values() for p in l.stage2_parameters()[key]]
    return [{"params": pick("weight"), "lr": t.lw_lr if t.finetuning_weights else 0.0},
            {"params": pick("scale"), "lr": t.lscale_lr},
            {"params": pick("transform"), "lr": t.lt_lr},
            {"params": pick("s1s2"), "lr": t.la_lr}]


@torch.no_grad()
def round_block_to_lattice(layers: dict[str, LiftLinear], M: Tensor, *, method: str,
                           margin: float, lattices: dict[str, Tensor] | None = None
                           ) -> dict[str, float]:
    """One batched nearest-code search over every linear of the block, then per-layer scales.

    Latent weights with ``|pre| <= margin`` become the stage-2 flip candidates. ``lattices``
    ({layer name: M}) gives layers of a per-layer mix their own matrix: one batched search per
    distinct lattice, statistics averaged over layers (candidates over latent bits).
    """
    if lattices is not None:
        groups: dict[str, dict[str, LiftLinear]] = {}
        for name, layer in layers.items():
            groups.setdefault(layer.spec.name, {})[name] = layer
        if len(groups) > 1:
            rel, cand, n_lat = 0.0, 0.0, 0
            for sub in groups.values():
                Mg = lattices[next(iter(sub))].to(M.device)
                st = round_block_to_lattice(sub, Mg, method=method, margin=margin)
                lat = sum(layer.signs.numel() for layer in sub.values())
                rel += st["weight_rel_err"] * len(sub)
                cand += st["candidate_fraction"] * lat
                n_lat += lat
            return {"weight_rel_err": rel / len(layers), "candidate_fraction": cand / max(1, n_lat)}
        M = lattices[next(iter(layers))].to(M.device)
    chunks = [layer.lattice_chunks()[0] for layer in layers.values()]  # (rows_l, d) each
    rows = [z.shape[0] for z in chunks]
    Z = torch.cat(chunks)  # (sum rows_l, d)
    del chunks
    D = M.shape[1]
    codes, idx, pre = encode_candidates(Z, M.to(Z.device, torch.float32), method=method,
                                        margin=margin)
    del Z
    rel, n_cand, n_lat, r0 = [], 0, 0, 0
    bounds = torch.tensor([0] + rows, device=idx.device).cumsum(0) * D
    cuts = torch.searchsorted(idx, bounds).tolist()
    for k, layer in enumerate(layers.values()):
        sel = slice(cuts[k], cuts[k + 1])
        stats = layer.set_codes(codes[r0:r0 + rows[k]], idx[sel] - r0 * D, pre[sel], M)
        rel.append(stats["rel_weight_err"])
        n_cand += stats["candidates"]
        n_lat += rows[k] * D
        r0 += rows[k]
    return {"weight_rel_err": sum(rel) / len(rel), "candidate_fraction": n_cand / max(1, n_lat)}


def _train_stage(block, data: BlockData, layers, *, stage: int, cfg: RunConfig, seed: int,
                 plan: MemoryPlan) -> tuple[dict, MemoryPlan]:
    """One stage with the memory plan, shrinking it after an out-of-memory before step 1."""
    groups = _groups_stage1 if stage == 1 else _groups_stage2
    while True:
        data.micro_batch = plan.micro_batch
        for layer in layers.values():
            layer.checkpoint_proxy = plan.checkpoint_proxy
            layer.cache_signs = plan.cache_signs
        try:
            out = train_block(block, data, param_groups=groups(layers, cfg),
                              epochs=cfg.stage_epochs(stage), batch_size=cfg.calib.batch_size,
                              n_samples=cfg.stage_nsamples(stage), seed=seed)
            return out, plan
        except OutOfMemoryBeforeStep as exc:
            smaller = shrink(plan)
            if smaller is None:
                raise MemoryError(f"stage {stage} does not fit the accelerator even with "
                                  f"micro-batch 1 and checkpointing ({exc}); raise "
                                  "--max_gpu_memory or lower --seqlen") from None
            logger.warning("stage %d out of memory with %s; retrying with micro-batch %d, "
                           "checkpointing on", stage, plan.describe(), smaller.micro_batch)
            if data.device.type == "cuda":
                torch.cuda.empty_cache()
            plan = smaller


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
    plan: MemoryPlan,
    clock: _Clock,
    lattices: dict[str, tuple[LatticeSpec, Tensor]] | None = None,
) -> tuple[dict[str, Any], MemoryPlan]:
    """Stage 1, lattice rounding, stage 2 and packing of one block (on ``data.device``).

    ``lattices`` ({linear name in the block: (spec, M)}) overrides ``spec``/``M`` per layer."""
    bs = cfg.calib.batch_size
    for p in block.parameters():
        p.requires_grad_(False)
    layers = _to_lift(block, adapter, stats, spec, cfg, plan, lattices)
    row: dict[str, Any] = {}
    if uncalibrated := experts_without_tokens(adapter.block_groups(block), stats):
        row["experts_without_tokens"] = uncalibrated  # moe.py: s1 = 1, no gradient
    row["stage1"], plan = _train_stage(block, data, layers, stage=1, cfg=cfg, seed=seed,
                                       plan=plan)
    clock.lap("stage1")
    row["holdout_proxy"] = holdout_error(block, data, batch_size=bs)
    clock.lap("holdout")
    lr = cfg.train.lw_lr if cfg.train.finetuning_weights else 0.0
    margin = latent_flip_margin(lr, n_train=len(data.train_idx[:cfg.stage_nsamples(2)]),
                                epochs=cfg.stage_epochs(2), batch_size=bs)
    own = None if lattices is None else {n: m for n, (_, m) in lattices.items()}
    row.update(round_block_to_lattice(layers, M.to(data.device), method=cfg.lattice.search,
                                      margin=margin, lattices=own))
    row["flip_margin"] = margin
    clock.lap("search")
    row["holdout_rounded"] = holdout_error(block, data, batch_size=bs)
    clock.lap("holdout")
    row["stage2"], plan = _train_stage(block, data, layers, stage=2, cfg=cfg, seed=seed + 1,
                                       plan=plan)
    clock.lap("stage2")
    row["holdout_corrected"] = holdout_error(block, data, batch_size=bs)
    clock.lap("holdout")
    for name, layer in layers.items():
        packed = layer.pack()
        packed.backend = cfg.run.backend
        adapter.set_module(block, name, packed)
    clock.lap("pack")
    row["holdout_packed"] = holdout_error(block, data, batch_size=bs)
    clock.lap("holdout")
    return row, plan


# ------------------------------------------------------------------------------- model loop
@torch.no_grad()
def _propagate_quantized(block, data: BlockData, bs: int) -> None:
    with data.stream.writer(data.inputs) as out:
        for idx, (x,) in data.stream.batches(index_batches(range(len(data.inputs)), bs),
                                             data.inputs):
            with data.autocast():
                out.put(idx, forward_block(block, x, data.stream.kwargs(len(idx))))


def _open_caches(n: int, seq_len: int, hidden: int, dtype: torch.dtype, cfg: RunConfig):
    need = 2 * ActivationCache.estimate_bytes(n, seq_len, hidden, dtype)
    cap = None if cfg.calib.max_host_memory is None else int(cfg.calib.max_host_memory * GIB)
    mode = (choose_mode(need, cap_bytes=cap) if cfg.calib.cache_mode == "auto"
            else cfg.calib.cache_mode)
    logger.info("memory plan: activation caches 2 x %d x %d x %d %s = %.2f GiB (%s mode%s)",
                n, seq_len, hidden, str(dtype).replace("torch.", ""), need / GIB, mode,
                "" if cap is None else f", host cap {cfg.calib.max_host_memory:.1f} GiB")
    X = ActivationCache(n, seq_len, hidden, dtype=dtype, mode=mode, path=cfg.calib.cache_dir)
    try:
        Y = ActivationCache(n, seq_len, hidden, dtype=dtype, mode=mode, path=cfg.calib.cache_dir)
    except BaseException:
        X.close()
        raise
    return X, Y, {"cache_mode": mode, "cache_gib": round(need / GIB, 3)}


def _initial_plan(model, adapter, spec, cfg: RunConfig, device, compute_dtype, margin):
    budget = gpu_budget_bytes(device, cfg.calib.max_gpu_memory)
    plan = plan_block(adapter.get_blocks(model)[0], adapter, spec, seq_len=cfg.calib.seqlen,
                      batch_size=cfg.calib.batch_size, compute_dtype=compute_dtype,
                      cand_fraction=min(1.0, CANDIDATE_DENSITY * 2 * margin),
                      budget_bytes=budget, compiled_proxy=compile_proxy_on(cfg, device))
    logger.info("memory plan: one block on %s in %s: %s", device,
                str(compute_dtype).replace("torch.", ""), plan.describe())
    return plan


def _cap_allocator(device: torch.device, cap_gib: float | None) -> None:
    """Hand ``--max_gpu_memory`` to the CUDA allocator (None: lift the cap again)."""
    if device.type != "cuda":
        return
    index = cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    frac = 1.0 if cap_gib is None else min(1.0, cap_gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(frac, index)


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
    lattice_map: dict[str, tuple[LatticeSpec, Tensor]] | None = None,
    only_blocks: Collection[int] | None = None,
    on_block_saved: Callable[[int], None] | None = None,
) -> list[dict]:
    """Quantize every decoder block of ``model`` in place; return one report row per block.

    ``lattice_map`` ({full module name: (spec, M)}, e.g. ``model.layers.3.mlp.up_proj``) gives
    every quantized linear its own lattice (a per-layer mix, :func:`liftquant.quantize.rate.plan_mix`);
    ``spec``/``M`` then size the memory plan (pass the widest lattice of the mix).

    ``only_blocks`` (one rank of a torchrun job, :mod:`liftquant.quantize.distributed`; needs
    ``propagate="fp"``): quantize just these blocks, run the others before the last of them
    only forward in FP (their outputs are the next inputs) and leave them and the later blocks
    untouched; rows are returned for these blocks only. ``on_block_saved(i)`` is called after
    block ``i`` was computed and its file written.
    """
    from tqdm.auto import tqdm

    own = None if only_blocks is None else set(only_blocks)
    if own is not None and cfg.train.propagate != "fp":
        raise ValueError("quantizing a subset of the blocks (one torchrun rank) needs "
                         "--propagate fp: with --propagate quantized a block's inputs come "
                         "from the quantized blocks before it")

    n, seq_len = calib_ids.shape
    unfuse_experts(model)  # MoE: fused 3-D experts -> per-expert linears (no-op if dense)
    model_dtype = next(model.parameters()).dtype
    compute_dtype = resolve_compute_dtype(cfg.train.compute_dtype, device)
    cache_dtype = torch.float32 if model_dtype == torch.float32 else torch.bfloat16
    n_hold = cfg.train.holdout or max(1, n // 32)
    lr = cfg.train.lw_lr if cfg.train.finetuning_weights else 0.0
    margin = latent_flip_margin(lr, n_train=min(n - n_hold, cfg.stage_nsamples(2)),
                                epochs=cfg.stage_epochs(2), batch_size=cfg.calib.batch_size)
    plan = _initial_plan(model, adapter, spec, cfg, device, compute_dtype, margin)
    hidden = model.config.get_text_config().hidden_size  # VLM configs nest the LM's config
    X, Y, cache_info = _open_caches(n, seq_len, hidden, cache_dtype, cfg)
    _cap_allocator(device, cfg.calib.max_gpu_memory)
    stream = None
    try:
        t0 = time.perf_counter()
        kwargs = capture_block_inputs(model, adapter, calib_ids, cache=X,
                                      batch_size=cfg.calib.batch_size, device=device)
        capture_s = round(time.perf_counter() - t0, 3)
        stream = BlockStream(kwargs, device=device, dtype=compute_dtype)
        split = {"train_idx": list(range(n - n_hold)), "holdout_idx": list(range(n - n_hold, n))}
        blocks = adapter.get_blocks(model)
        rows, times = [], []
        last = len(blocks) if own is None else max(own, default=-1) + 1
        for i in tqdm(range(last), desc="blocks"):
            t_block = time.perf_counter()
            clock = _Clock(device, i)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seed_everything(cfg.calib.seed + i)
            block = blocks[i].to(device=device)
            stream.use_kwargs(kwargs_for_block(kwargs, i))  # hybrid layer types differ
            if compute_dtype == torch.float32:
                block = block.float()
            data = BlockData(inputs=X, targets=Y, stream=stream, device=device,
                             compute_dtype=compute_dtype, micro_batch=plan.micro_batch,
                             deterministic=cfg.train.deterministic, **split)
            path = block_file(blocks_dir, i)
            fp_only = own is not None and i not in own  # another rank quantizes it
            done = resume and not fp_only and is_finished(path)
            fill = cfg.train.propagate == "fp" or not done
            clock.lap("to_device")
            stats = fp_targets_and_stats(block, adapter, data, batch_size=cfg.calib.batch_size,
                                         fill=fill)
            clock.lap("targets")
            if fp_only:
                row = {}
            elif done:
                row = load_finished_block(block, path, adapter=adapter, spec=spec if (
                    lattice_map is None) else {n: lattice_map[f"{adapter.blocks}.{i}.{n}"][0]
                                               for n in adapter.linear_names(block)},
                                          backend=cfg.run.backend, device=device,
                                          fingerprint=fingerprint)
                logger.info("block %d/%d resumed from %s", i + 1, len(blocks), path)
            else:
                block_lattices = None if lattice_map is None else {
                    name: lattice_map[f"{adapter.blocks}.{i}.{name}"]
                    for name in adapter.linear_names(block)}
                row, plan = quantize_block(block, adapter=adapter, data=data, stats=stats, M=M,
                                           spec=spec, cfg=cfg, seed=cfg.calib.seed + i,
                                           plan=plan, clock=clock, lattices=block_lattices)
                row = {"block": i, **row}
            if cfg.train.propagate == "fp":
                X, Y = Y, X  # FP outputs of block i are the inputs of block i + 1
            else:
                _propagate_quantized(block, data, cfg.calib.batch_size)
            cast_unquantized(block, model_dtype)
            blocks[i] = block.to("cpu")
            clock.lap("offload")
            if fp_only:
                continue
            row["time_split"] = clock.split
            row["memory_plan"] = plan.to_dict()
            if i == 0:
                row["capture_seconds"] = capture_s
                row.update(cache_info)
            if not done:  # a resumed block keeps the seconds and peak of the run that made it
                row["seconds"] = round(time.perf_counter() - t_block, 2)
                row["peak_gib"] = round(peak_memory_gib(device), 3)
                if path is not None:
                    save_block(path, blocks[i], row, fingerprint=fingerprint)
                _log_row(row, len(blocks))
                times.append(row["seconds"])
                _log_eta(times, len(blocks) - i - 1 if own is None else sum(j > i for j in own))
                if on_block_saved is not None:
                    on_block_saved(i)
            rows.append(row)
    finally:  # disk-backed caches delete their files here, also on errors
        if stream is not None:
            stream.close()
        X.close()
        Y.close()
        if cfg.calib.max_gpu_memory is not None:
            _cap_allocator(device, None)
    return rows


def _log_eta(times: list[float], left: int) -> None:
    """``left``: blocks this process still quantizes."""
    if not left:
        return
    recent = times[1:] or times  # block 1 pays one-time costs (autotuning, allocator growth)
    per = sum(recent) / len(recent)
    logger.info("ETA: %d blocks left x %.1f s = %.1f min", left, per, left * per / 60)


def _log_row(row: dict, n_blocks: int) -> None:
    split = " ".join(f"{k} {v:.1f}" for k, v in row["time_split"].items())
    logger.info(
        "block %d/%d stage1 loss %.3e->%.3e | rounded %.4f stage2 loss %.3e->%.3e "
        "holdout_rel_mse %.4f (packed %.4f) %.1fs [%s] peak %.2f GiB",
        row["block"] + 1, n_blocks, row["stage1"]["loss_first"], row["stage1"]["loss_last"],
        row["holdout_rounded"], row["stage2"]["loss_first"], row["stage2"]["loss_last"],
        row["holdout_corrected"], row["holdout_packed"], row["seconds"], split,
        row["peak_gib"])
