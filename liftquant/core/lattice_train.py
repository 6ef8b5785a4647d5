"""Training the lattice matrix M (paper Eq. 1) by a soft-min relaxation.

Objective per step, on a fresh batch z ~ N(0, I_d) (B, d) and a candidate code set C_z::

    loss = mean_z  -(1/tau) * logsumexp_{y in C_z}( -tau * ||z - M y||^2 )

which tends to ``E min_y ||z - M y||^2`` as ``tau -> inf``. Candidates are all 2^D codes when
that fits the memory budget, otherwise a random subset of the published pinv candidates
``sign(M_pinv z + N^T p)`` (fresh paddings every step) plus their greedy bit-flip refinement.
Adam with a cosine learning-rate decay, the temperature annealed geometrically from ``tau``
to ``tau_final``, several random restarts; the restart with the lowest MSE under the real
search (``lattice.gaussian_mse``) on held-out Gaussian vectors wins. :func:`lloyd_refine` then
alternates that search with the closed-form least-squares M (Lloyd iterations).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from liftquant.core.lattice import (
    LatticeSpec,
    all_codes,
    encode,
    gaussian_mse,
    null_space,
    padding_offsets,
    refine_flips,
    search_bases,
)
from liftquant.util.log import get_logger

logger = get_logger("lattice_train")

# Default hyper-parameters (SPEC §2: Adam, ~3000 steps, batch 400-500, lr 0.01-0.02 decayed
# to lr/10..lr/20, tau ~ 10, several restarts).
DEFAULT_STEPS = 3000
DEFAULT_BATCH = 512
DEFAULT_LR = 0.02
DEFAULT_LR_FINAL_RATIO = 1 / 20
DEFAULT_TAU = 10.0
# Per-step candidate tensor budget (batch x candidates x D elements).
DEFAULT_CANDIDATE_BUDGET = 1 << 24
# On CPU the full pinv search joins the candidate set only while 2^(D-d) stays this small.
FULL_SEARCH_CPU_NULL_DIM = 10


@dataclass
class TrainResult:
    M: Tensor
    mse: float
    restart_mse: list[float] = field(default_factory=list)
    best_restart: int = 0
    steps_done: int = 0


def _candidates(z: Tensor, M: Tensor, *, budget: int, gen: torch.Generator) -> Tensor:
    """Candidate codes (B, K, D) or a shared (2^D, D) set, computed without gradients."""
    d, D = M.shape
    B = z.shape[0]
    if D <= 20 and (B << D) * 2 <= budget:
        return all_codes(D, device=M.device, dtype=M.dtype)  # (2^D, D) shared by all rows
    M_pinv, N = null_space(M)
    k = max(1, min(1 << (D - d), budget // (B * D)))
    if k == 1 << (D - d):
        P = all_codes(D - d, device=M.device, dtype=M.dtype)
    else:
        P = torch.randint(0, 2, (k, D - d), generator=gen, device="cpu").to(M) * 2 - 1
    v = (z @ M_pinv.T)[:, None, :] + (P @ N)[None]  # (B, K, D)
    y = torch.where(v >= 0, 1.0, -1.0).to(M.dtype)
    dist = (y @ M.T - z[:, None, :]).square().sum(-1)  # (B, K)
    best = y[torch.arange(B, device=M.device), dist.argmin(1)]  # (B, D)
    extra = [refine_flips(z, best, M)]
    if k < (1 << (D - d)) and (M.is_cuda or D - d <= FULL_SEARCH_CPU_NULL_DIM):
        # the code the quantizer's own search (all paddings + flips) picks: training then
        # optimises M for the search that will actually be used
        extra.append(encode(z, M, method="pinv").to(M.dtype))
    return torch.cat([y] + [e[:, None, :] for e in extra], dim=1)  # (B, K + extra, D)


def _softmin_loss(z: Tensor, M: Tensor, cand: Tensor, tau: float) -> Tensor:
    if cand.dim() == 2:  # shared set: ||z||^2 - 2 (M^T z).y + ||M y||^2
        q = (cand @ M.T).square().sum(-1)  # (C,)
        dist = z.square().sum(-1, keepdim=True) - 2.0 * (z @ M) @ cand.T + q[None]  # (B, C)
    else:
        dist = (cand @ M.T - z[:, None, :]).square().sum(-1)  # (B, K)
    return (-torch.logsumexp(-tau * dist, dim=1) / tau).mean()


def _train_once(
    spec: LatticeSpec,
    *,
    steps: int,
    batch: int,
    lr: float,
    lr_final_ratio: float,
    tau: float,
    tau_final: float,
    seed: int,
    device: torch.device,
    budget: int,
    progress: bool,
    init: Tensor | None,
    deadline: float | None,
) -> tuple[Tensor, int]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    d, D = spec.target_dim, spec.lifted_dim
    if init is not None:
        M0 = init.float().clone()
    else:  # entries N(0, 1/D): each decoded coordinate has unit variance, like the source
        M0 = torch.randn(d, D, generator=gen) / math.sqrt(D)
    M = torch.nn.Parameter(M0.to(device))
    opt = torch.optim.Adam([M], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: lr_final_ratio + (1 - lr_final_ratio) * 0.5 * (1 + math.cos(math.pi * s / steps)),
    )
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"{spec.name} seed {seed}", leave=False)
    done = 0
    for step in it:
        if deadline is not None and time.monotonic() > deadline:
            logger.warning("%s: hard time limit hit at step %d/%d", spec.name, step, steps)
            break
        t = tau * (tau_final / tau) ** (step / max(1, steps - 1))
        z = torch.randn(batch, d, generator=gen).to(device)
        with torch.no_grad():
            cand = _candidates(z, M.detach(), budget=budget, gen=gen)
        loss = _softmin_loss(z, M, cand, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"lattice training diverged at step {step} (loss {loss})")
        done = step + 1
    return M.detach().cpu(), done


def train_projection(
    spec: LatticeSpec | str,
    *,
    steps: int = DEFAULT_STEPS,
    batch: int = DEFAULT_BATCH,
    lr: float = DEFAULT_LR,
    lr_final_ratio: float = DEFAULT_LR_FINAL_RATIO,
    tau: float = DEFAULT_TAU,
    tau_final: float | list[float] | None = None,
    restarts: int = 4,
    seed: int = 0,
    device: torch.device | str = "cpu",
    budget: int = DEFAULT_CANDIDATE_BUDGET,
    n_select: int = 20_000,
    method: str = "auto",
    progress: bool = True,
    init: Tensor | None = None,
    time_limit: float | None = None,
    hard_time_limit: float | None = None,
) -> TrainResult:
    """Train M for ``spec`` with ``restarts`` random starts; keep the best by held-out MSE.

    ``tau_final`` (default: ``tau``) anneals the soft-min temperature geometrically (a list
    cycles over restarts, so restarts compare schedules and the best one wins); the
    selection MSE uses ``n_select`` fresh Gaussian vectors and the search ``method`` that the
    quantizer will use. ``time_limit`` (seconds) stops starting new restarts once exceeded
    (at least one restart always completes); ``hard_time_limit`` also cuts a running restart
    short (``TrainResult.steps_done`` then reports the steps the winner actually made).
    """
    spec = LatticeSpec.parse(spec)
    device = torch.device(device)
    results: list[tuple[float, Tensor, int]] = []
    finals = [tau] if tau_final is None else (
        [float(t) for t in tau_final] if isinstance(tau_final, (list, tuple)) else [tau_final])
    start = time.monotonic()
    for r in range(restarts):
        if r and time_limit is not None and time.monotonic() - start > time_limit:
            logger.info("%s: time limit reached after %d restarts", spec.name, r)
            break
        M, done = _train_once(
            spec,
            steps=steps,
            batch=batch,
            lr=lr,
            lr_final_ratio=lr_final_ratio,
            tau=tau,
            tau_final=finals[r % len(finals)],
            seed=seed * 1000 + r,
            device=device,
            budget=budget,
            progress=progress,
            init=init if r == 0 else None,
            deadline=None if hard_time_limit is None else start + hard_time_limit,
        )
        mse = gaussian_mse(M, n=n_select, seed=10_000 + seed, method=method, device=device)
        logger.info("%s restart %d/%d (tau %g->%g): mse %.5f", spec.name, r + 1, restarts, tau,
                    finals[r % len(finals)], mse)
        results.append((mse, M, done))
    best = min(range(len(results)), key=lambda i: results[i][0])
    return TrainResult(
        M=results[best][1],
        mse=results[best][0],
        restart_mse=[r[0] for r in results],
        best_restart=best,
        steps_done=results[best][2],
    )


def lloyd_refine(
    M: Tensor,
    *,
    iters: int = 4,
    n: int = 200_000,
    seed: int = 0,
    method: str = "auto",
    bases: int | None = None,
    device: torch.device | str = "cpu",
    n_select: int = 20_000,
    batch: int = 1 << 16,
    ridge: float = 1e-6,
    time_limit: float | None = None,
) -> tuple[Tensor, list[float]]:
    """Lloyd iterations on M: codes by the quantizer's search, then the least-squares M.

    With the codes ``b`` of ``n`` fresh Gaussian vectors ``x`` fixed, the M minimising
    ``sum ||x - M b||^2`` is ``(sum x b^T)(sum b b^T)^-1`` (a ridge keeps it solvable); the
    search is then rerun under the new M. Soft-min training optimises a smoothed objective
    over a candidate subset, so its M is in general not a fixed point of this map. Each
    iterate is scored on ``n_select`` held-out vectors (a seed not used for fitting) and the
    best M seen, the input included, is returned with the list of scores (input first).
    ``time_limit`` (seconds) stops starting new iterations once exceeded.
    """
    device = torch.device(device)
    d, D = M.shape
    if iters < 0 or n < D:
        raise ValueError(f"lloyd_refine: need iters >= 0 and n >= D (got {iters}, {n})")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cur = M.detach().float().to(device)
    if method == "auto":
        method = LatticeSpec(D, d).default_method(device.type)
    bases = bases or search_bases(D, d)

    def score(m: Tensor) -> float:
        return gaussian_mse(m, n=n_select, seed=20_000 + seed, method=method, device=device,
                            bases=bases)

    scores = [score(cur)]
    best, best_mse = cur.clone(), scores[0]
    eye = torch.eye(D, dtype=torch.float64, device=device)
    start = time.monotonic()
    for it in range(iters):
        if time_limit is not None and it and time.monotonic() - start > time_limit:
            logger.info("lloyd: time limit reached after %d iterations", it)
            break
        G = torch.zeros(D, D, dtype=torch.float64, device=device)
        C = torch.zeros(d, D, dtype=torch.float64, device=device)
        off = padding_offsets(cur, bases=bases) if method == "pinv" else None
        for start in range(0, n, batch):
            x = torch.randn(min(batch, n - start), d, generator=gen).to(device)
            b = encode(x, cur, method=method, offsets=off).to(torch.float64)
            G += b.T @ b
            C += x.to(torch.float64).T @ b
        cur = torch.linalg.solve(G + ridge * n * eye, C.T).T.float().contiguous()
        scores.append(score(cur))
        logger.info("lloyd %d/%d: held-out mse %.6f", it + 1, iters, scores[-1])
        if scores[-1] < best_mse:
            best, best_mse = cur.clone(), scores[-1]
    return best.cpu(), scores
