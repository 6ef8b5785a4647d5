"""Per-shape choice of the decode GEMV, measured on the GPU (like ``triton.autotune``).

Candidates are launch configurations of two kernels: the split-K row stream
(:mod:`~liftquant.kernels.gemv_splitk`: slice width, hence split factor, rows per step, rows per
program, warps, word loop) and the row tile (:mod:`~liftquant.kernels.gemv_rowtile`, validated
on an H100 and needing no workspace). On the first call of a problem shape outside CUDA-graph
capture every candidate is built, run once and compared with the first row-tile result (a
candidate that fails to build or disagrees is skipped and recorded in ``rejected``), then
timed back to back in a CUDA graph over rotating weight copies, as a graphed decode step runs
them (:func:`graph_time`); the fastest is cached per shape.
During capture, in the interpreter, or with ``tune=False`` (``KernelPolicy.tune``,
``LIFTQUANT_TUNE=0``) a heuristic picks instead. ``kind="splitk"|"rowtile"``
(``KernelPolicy.gemv_kind``, ``LIFTQUANT_GEMV``) restricts the candidates to one kernel.
Each Triton backend owns one tuner built from its policy (``registry``); the module's
:data:`GEMV_TUNER` (default policy) serves direct calls of :func:`gemv`.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import Tensor

from liftquant.kernels.cache import KernelCache
from liftquant.kernels.gemv_rowtile import launch_gemv, pick_gemv_config, rowtile_candidates
from liftquant.kernels.gemv_splitk import (
    WORKSPACES,
    SplitKConfig,
    Workspaces,
    launch_gemv_splitk,
    workspace_ready,
)
from liftquant.kernels.policy import interpreting

KINDS = ("auto", "splitk", "rowtile")
# Split-K kernel variants (block_w words per slice, block_n rows per step, warps, word loop).
# block_w = 4 words x lanes along K, so the warps of a program sit along rows and share one
# activation slice; 64-word slices keep the last slice's waste small for 8B shapes (KW 256-
# 1344). 2 and 4 rows per thread per step; v1 is the shift-flip-add loop of bench/kernels/README.md.
SPLITK_VARIANTS = ((64, 16, 4, "v2"), (64, 32, 4, "v2"), (128, 8, 4, "v2"), (128, 16, 4, "v2"),
                   (64, 8, 1, "v2"), (128, 8, 4, "v1"))
# Rows per program are set per shape so that the grid holds this many warps per SM: fewer,
# longer programs reuse their activation slice over more rows (activation bytes read from L2
# per weight byte: 16 / rows per program); more programs hide more latency.
WARPS_PER_SM = (8, 16, 32)
HEURISTIC_SPLITK = (64, 16, 4, "v2", 16)
# A candidate whose output differs from the reference candidate's by more than this (relative
# Frobenius norm) is rejected: both round the same sums in fp16, so real results agree to ~1e-3.
VERIFY_RTOL = 2e-2
# Split-K must beat the best row tile by this factor in the tuner's timing to be chosen. On the
# H100 sweep of commit c63a032 (bench/kernels/README.md), split-K winners within 5 % of the row tile
# in the tuner's timing ran slower than the row tile in the benchmark on some shapes.
SPLITK_MARGIN = 0.95
# The tuner times each candidate over rotating weight copies totalling this many bytes (more
# than the H100's 50 MB L2; 2 to 16 copies, so layers under 8 MB rotate through less), in a
# CUDA graph as the decode step runs it. Timing one copy
# with do_bench (L2 flushed between runs) picked split-K configurations that then ran
# slower than the row tile in the benchmark (bench/kernels/README.md).
ROTATE_BYTES = 128 * 2**20


def rows_per_program(*, N: int, split: int, block_n: int, num_warps: int, n_sm: int,
                     warps_per_sm: int) -> int:
    """Rows per program so that ``split * ceil(N / rows) * num_warps ~ warps_per_sm * n_sm``."""
    rows = -(-N * split * num_warps // (warps_per_sm * n_sm))
    rows = -(-rows // block_n) * block_n
    return max(block_n, min(rows, -(-N // block_n) * block_n))


def splitk_candidates(*, N: int, KW: int, n_sm: int, use_asm: bool) -> list[SplitKConfig]:
    out = []
    for block_w, block_n, num_warps, loop in SPLITK_VARIANTS:
        split = -(-KW // block_w)
        for wps in WARPS_PER_SM:
            rpp = rows_per_program(N=N, split=split, block_n=block_n, num_warps=num_warps,
                                   n_sm=n_sm, warps_per_sm=wps)
            cfg = SplitKConfig(block_w, block_n, rpp, num_warps, use_asm, loop)
            if cfg not in out:
                out.append(cfg)
    return out


def pick_splitk_config(*, N: int, KW: int, n_sm: int, use_asm: bool) -> SplitKConfig:
    """Heuristic when not tuning: 64-word slices, 16 rows per step over 4 warps, 16 warps/SM."""
    block_w, block_n, num_warps, loop, wps = HEURISTIC_SPLITK
    rpp = rows_per_program(N=N, split=-(-KW // block_w), block_n=block_n, num_warps=num_warps,
                           n_sm=n_sm, warps_per_sm=wps)
    return SplitKConfig(block_w, block_n, rpp, num_warps, use_asm, loop)


def launch_config(cfg, xp: Tensor, wsc: Tensor, packed: Tensor, scale: Tensor,
                  bias: Tensor | None, out_dtype: torch.dtype,
                  members: tuple[int, ...] | None = None, *, pdl: bool = False,
                  workspaces: Workspaces | None = None) -> Tensor:
    if isinstance(cfg, SplitKConfig):
        return launch_gemv_splitk(xp, wsc, packed, scale, bias, out_dtype, cfg=cfg,
                                  members=members, pdl=pdl, workspaces=workspaces)
    if members is not None and len(members) > 1:
        raise ValueError("the row-tile GEMV runs single layers; groups need split-K")
    return launch_gemv(xp, wsc, packed, scale, bias, out_dtype, block_n=cfg.block_n,
                       block_w=cfg.block_w, num_warps=cfg.num_warps, use_asm=cfg.use_asm,
                       pdl=pdl)


def _n_sm(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: an H100's count keeps the heuristics' shapes realistic


def _rel_diff(a: Tensor, b: Tensor) -> float:
    a, b = a.float(), b.float()
    scale = max(float(a.norm()), float(b.norm()), 1e-30)
    return float((a - b).norm()) / scale


class GemvTuner:
    """GEMV launch configuration per problem shape, measured once; see the module docstring."""

    def __init__(self, *, kind: str = "auto", tune: bool = True,
                 workspaces: Workspaces | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"GEMV kind {kind!r}; choose from {', '.join(KINDS)}")
        self.kind, self.tune_enabled = kind, tune
        self.workspaces = workspaces if workspaces is not None else WORKSPACES
        self.cache = KernelCache("triton-gemv")
        self.timings: dict[tuple, dict[str, float]] = {}  # key -> {label: us}
        self.rejected: dict[tuple, dict[str, str]] = {}  # key -> {label: reason}
        self.asm_failed: str | None = None  # why the inline-PTX kernels do not build here

    def key(self, xp: Tensor, packed: Tensor, bias: Tensor | None, out_dtype: torch.dtype,
            members: tuple[int, ...] | None = None) -> tuple:
        """(rows, words, aligned, dtype, bias, device, group members, kind); a group (q/k/v as
        one launch) only has split-K candidates."""
        aligned = packed.shape[1] % 16 == 0
        group = tuple(members) if members is not None and len(members) > 1 else None
        kind = "splitk" if group else self.kind
        return (packed.shape[0], xp.shape[-1], aligned, out_dtype, bias is not None,
                str(xp.device), group, kind)

    def candidates(self, key: tuple, n_sm: int, use_asm: bool) -> list:
        N, KW, aligned, *_, kind = key
        cands = [] if kind == "splitk" else rowtile_candidates(aligned=aligned, use_asm=use_asm)
        if kind != "rowtile":
            cands += splitk_candidates(N=N, KW=KW, n_sm=n_sm, use_asm=use_asm)
        return cands

    def heuristic(self, key: tuple, n_sm: int, *, splitk: bool = True):
        N, KW, _, *_, kind = key
        use_asm = self.asm_failed is None and not interpreting()
        if splitk and kind != "rowtile":
            return pick_splitk_config(N=N, KW=KW, n_sm=n_sm, use_asm=use_asm)
        return dataclasses.replace(pick_gemv_config(N, KW, n_sm), use_asm=use_asm)

    def _launch(self, cfg, *args, pdl: bool = False) -> Tensor:
        return launch_config(cfg, *args, pdl=pdl, workspaces=self.workspaces)

    def run(self, xp: Tensor, wsc: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None,
            out_dtype: torch.dtype, members: tuple[int, ...] | None = None, *,
            pdl: bool = False) -> Tensor:
        """``scale * (Y @ x) + bias`` with the configuration chosen for this shape; ``pdl``:
        the planner's launch decision."""
        key = self.key(xp, packed, bias, out_dtype, members)
        members = key[6]
        args = (xp, wsc, packed, scale, bias, out_dtype, members)
        n_sm = _n_sm(xp.device)
        capturing = xp.is_cuda and torch.cuda.is_current_stream_capturing()
        cfg = self.cache.lookup(key)
        if cfg is None and capturing:  # no timing inside a graph capture
            cfg = self.heuristic(key, n_sm)
        elif cfg is None and (interpreting() or not self.tune_enabled):
            return self._first_run(key, n_sm, args, pdl)
        elif cfg is None:
            cfg = self.cache.get(key, lambda: self.tune(args, key=key, n_sm=n_sm))
        if capturing and isinstance(cfg, SplitKConfig) and not workspace_ready(
                xp, packed, cfg, members, self.workspaces):
            if members:
                raise RuntimeError("a grouped split-K GEMV needs its workspace before CUDA "
                                   "graph capture: run one step eagerly first")
            cfg = self.heuristic(key, n_sm, splitk=False)  # no allocation inside a capture
        return self._launch(cfg, *args, pdl=pdl)

    def _first_run(self, key: tuple, n_sm: int, args: tuple, pdl: bool = False) -> Tensor:
        """The heuristic's first launch for ``key``. A build failure falls back to the plain
        Triton loop (warning once), then to the row tile; what ran is cached."""
        cfg = self.heuristic(key, n_sm)
        while True:
            try:
                out = self._launch(cfg, *args, pdl=pdl)
                self.cache.get(key, lambda c=cfg: c)
                return out
            except Exception as err:  # compiler / PTX assembler failure
                if cfg.use_asm:
                    self._asm_unavailable(err)
                    cfg = dataclasses.replace(cfg, use_asm=False)
                elif isinstance(cfg, SplitKConfig):
                    cfg = self.heuristic(key, n_sm, splitk=False)
                else:
                    raise

    def _asm_unavailable(self, err: Exception) -> None:
        if self.asm_failed is None:
            self.asm_failed = f"{type(err).__name__}: {err}"[:500]
            warnings.warn("liftquant: inline-PTX int1 GEMV unavailable, using the plain Triton "
                          f"loop ({self.asm_failed})", RuntimeWarning, stacklevel=3)

    def tune(self, args: tuple, *, key: tuple | None = None, n_sm: int | None = None,
             rep_ms: int = 20):
        """Build, check and time every candidate for ``args``; returns the fastest."""
        from triton.testing import do_bench

        xp, packed = args[0], args[2]
        key = key or self.key(xp, packed, args[4], args[5], *args[6:])
        n_sm = n_sm or _n_sm(xp.device)
        use_asm = self.asm_failed is None
        times, rejected, ref = {}, self.rejected.setdefault(key, {}), None
        copies = weight_copies(packed) if xp.is_cuda else [packed]
        for cfg in self.candidates(key, n_sm, use_asm):
            try:
                out = launch_config(cfg, *args, workspaces=self.workspaces)
                if xp.is_cuda:
                    torch.cuda.synchronize(xp.device)  # asynchronous launch errors surface here
            except Exception as err:  # noqa: BLE001 - a candidate that does not build
                rejected[cfg.label] = f"{type(err).__name__}: {err}"[:300]
                continue
            if not torch.isfinite(out).all():
                rejected[cfg.label] = "non-finite output"
                continue
            if ref is None:
                ref = out
            elif (diff := _rel_diff(out, ref)) > VERIFY_RTOL:
                rejected[cfg.label] = f"differs from the reference candidate by {diff:.2e}"
                continue
            if xp.is_cuda:
                times[cfg] = graph_time(lambda w, c=cfg: launch_config(
                    c, xp, args[1], w, *args[3:], workspaces=self.workspaces),
                    [(w,) for w in copies])
            else:
                times[cfg] = do_bench(lambda c=cfg: launch_config(
                    c, *args, workspaces=self.workspaces), warmup=5, rep=rep_ms,
                    return_mode="median")
        if not times:
            if use_asm:  # nothing with inline PTX built: the plain Triton loops
                self._asm_unavailable(RuntimeError(next(iter(rejected.values()), "no candidate")))
                return self.tune(args, key=key, n_sm=n_sm, rep_ms=rep_ms)
            raise RuntimeError(f"no int1 GEMV candidate ran for {key}: {rejected}")
        self.timings[key] = {c.label: t * 1e3 for c, t in times.items()}
        return pick_fastest(times)


def weight_copies(packed: Tensor, total_bytes: int = ROTATE_BYTES) -> list[Tensor]:
    """``packed`` and clones of it, enough that their bytes exceed the L2 cache (at most 16):
    a decode step reads each weight once, from HBM."""
    n = min(16, max(2, -(-total_bytes // max(packed.numel() * packed.element_size(), 1))))
    copies = [packed]
    try:
        copies += [packed.clone() for _ in range(n - 1)]
    except torch.OutOfMemoryError:  # a nearly full GPU: time over the one copy (L2-warm)
        warnings.warn("liftquant: no memory for rotating weight copies while tuning the GEMV; "
                      "timing one copy", RuntimeWarning, stacklevel=3)
    return copies


def graph_time(launch, args: list[tuple], min_calls: int = 8) -> float:
    """Milliseconds per call of ``launch(*args[i])`` replayed back to back in one CUDA graph,
    rotating over ``args`` (weight copies): what a graphed decode step pays, launch gaps
    included. Median of 5 replays."""
    calls = max(len(args), min_calls)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            launch(*args[i % len(args)])
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return sorted(times)[2]


def pick_fastest(times: dict):
    """The fastest timed configuration; split-K only if it wins by :data:`SPLITK_MARGIN`."""
    best = min(times, key=times.get)
    rowtile = [c for c in times if not isinstance(c, SplitKConfig)]
    if isinstance(best, SplitKConfig) and rowtile:
        best_rt = min(rowtile, key=times.get)
        if times[best] > SPLITK_MARGIN * times[best_rt]:
            return best_rt
    return best


GEMV_TUNER = GemvTuner()
# Tuners of backend instances, by id: the custom ops receive the id (an int argument that
# torch.compile bakes in) and run that backend's tuner; -1 is GEMV_TUNER.
_TUNERS: list[GemvTuner] = []


def register_tuner(tuner: GemvTuner) -> int:
    """Make ``tuner`` reachable from the custom ops; returns its id."""
    _TUNERS.append(tuner)
    return len(_TUNERS) - 1


def tuner_by_id(tuner_id: int) -> GemvTuner:
    return GEMV_TUNER if tuner_id < 0 else _TUNERS[tuner_id]


def gemv(xp: Tensor, wsc: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None,
         out_dtype: torch.dtype, members: tuple[int, ...] | None = None, *,
         tuner: GemvTuner | None = None, pdl: bool = False) -> Tensor:
    """Decode GEMV from the pair layout with the configuration ``tuner`` (default: the
    module's) chose for this shape (``members``: a group of layers, see
    ``gemv_splitk.launch_gemv_splitk``)."""
    return (tuner or GEMV_TUNER).run(xp, wsc, packed, scale, bias, out_dtype, members, pdl=pdl)


