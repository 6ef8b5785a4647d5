"""Rate selection: ``--expc``, ``--bits`` or ``--target_size_gb`` (SPEC §1 "fit the memory
budget"), uniform or as a per-layer mix of shipped lattices.

``--bits X`` equal to a shipped lattice's D/d (within :data:`BITS_TOLERANCE`) is that lattice
for every layer (:func:`lattice_for_bits`). Among lattices of equal rate (9to3 and 24to8 are
both 3 bits) the one practical on the device is taken: on CUDA the best Gaussian MSE recorded
in ``lattice/index.json``; on CPU the smallest D, because the search cost grows as 2^D or
2^(D-d) (on the 2-core CPU 9to3, the CPU demo's lattice, quantizes the whole demo model in
the time of bench/demo/README.md, while 24to8 did not finish a single SmolLM2 block). An ``X``
strictly between the lowest and highest shipped rates that no lattice has exactly is met as an
*average* by a per-layer mix; values outside the shipped range are refused with the range in
the message.

``--target_size_gb X`` always chooses a lattice per quantized linear (:func:`plan_mix`) so
that the predicted ``model.safetensors`` (:mod:`liftquant.io.size`, exact dtypes and header) is
``<= X`` GB and the unspent budget is less than one layer's next step.

The per-layer mix (documented proxy, issue 19). Layer ``l`` quantized with lattice ``k`` is
expected to add loss ``E_l(k) = mse_k * s_l``: whitened, RMS-normalised rows make the weight
error about ``mse_k`` (the lattice's Gaussian MSE from ``index.json``) per unit of row energy,
so the layer's output error per token is about ``mse_k * mean_i(y_i^2)``, and the layer's
sensitivity ``s_l`` says how much such an error costs (:func:`layer_sensitivity`, measured on
a few calibration sequences). ``--mix_proxy fisher`` (default) weighs the output error by the
squared loss gradient at that output (diagonal empirical Fisher: a loss increase, comparable
across layers); ``--mix_proxy energy`` uses the output error alone, ``||W||_F^2 * mean(x^2)``,
which measured on the demo model (bench/quality/quality.csv) spends the budget on late layers, whose
larger residual stream hides their error, and loses to the uniform lattice at equal size.
All layers start at the cheapest candidate lattice; a greedy pass repeatedly takes the
one-step upgrade (next higher rate) with the largest error reduction per extra byte that
still fits, dropping upgrades that do not fit (EXL3/Q-Palette-style budget spending, without
their measured per-layer curves).
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from liftquant.core.lattice import (
    LATTICE_DIR,
    LatticeSpec,
    lattice_path,
    search_bases,
    shipped_lattices,
)
from liftquant.io.size import (
    checkpoint_tensors,
    estimate_file_bytes,
    header_bytes,
    packed_tensors,
    quantized_linears,
    tensor_bytes,
)
from liftquant.models.adapters import ModelAdapter
from liftquant.util.log import get_logger

logger = get_logger("rate")

DEFAULT_LATTICE = "20to8"  # 2.5 bits: the authors' recommendation for ~30B models
BITS_TOLERANCE = 1e-6  # --bits must equal a shipped D/d this closely (15/7 = 2.142857...)


def quantized_linear_bytes(in_features: int, out_features: int, spec: LatticeSpec,
                           *, bias: bool) -> int:
    """Bytes a PackedLiftLinear stores: packed codes + scale, s1, L, R, s2_act (+ bias)."""
    return tensor_bytes(packed_tensors(in_features, out_features, spec, bias=bias))


def estimate_checkpoint_bytes(model: nn.Module, adapter: ModelAdapter, spec,
                              *, save_dtype: torch.dtype | None = None) -> int:
    """Bytes of the checkpoint's tensors at ``spec`` (one lattice or ``{module: lattice}``),
    unquantized tensors in ``save_dtype`` (None: as they are), tied head once: what
    ``checkpoint.bits_report`` reports as ``total_bytes``. The file adds its header
    (:func:`liftquant.io.size.estimate_file_bytes`, what ``--target_size_gb`` budgets)."""
    return tensor_bytes(checkpoint_tensors(model, adapter, spec, save_dtype=save_dtype))


def _device_type(device: str | torch.device | None) -> str:
    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    return kind


def recorded_mse(lattice_dir: str | Path | None = None) -> dict[str, float]:
    """Gaussian MSE per lattice name from ``<lattice_dir>/index.json`` (empty if unreadable)."""
    try:
        rows = json.loads((Path(lattice_dir or LATTICE_DIR) / "index.json").read_text())
        return {r["name"]: float(r["mse"]) for r in rows if r.get("mse") is not None}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _format_rate(bits: float) -> str:
    return f"{bits:.6f}".rstrip("0").rstrip(".")  # 6 decimals: within BITS_TOLERANCE


def shipped_rates(shipped: list[LatticeSpec]) -> str:
    """``"1.6 (16to10, 32to20), 2 (12to6, ...), ..."``: every shipped rate and its lattices."""
    by_rate: dict[str, list[str]] = {}
    for s in sorted(shipped, key=lambda s: (s.bits_per_weight, s.lifted_dim)):
        by_rate.setdefault(_format_rate(s.bits_per_weight), []).append(s.name)
    return ", ".join(f"{rate} ({', '.join(names)})" for rate, names in by_rate.items())


def lattice_for_bits(bits: float, *, lattice_dir: str | Path | None = None,
                     device: str | torch.device | None = None) -> tuple[LatticeSpec, dict]:
    """The shipped lattice of exactly ``bits`` per weight, or ``ValueError`` listing the rates.

    The one place ``--bits`` is interpreted: nothing is rounded to a nearby rate. Ties between
    lattices of equal rate go to the best recorded MSE on CUDA and the smallest D on CPU.
    """
    shipped = [LatticeSpec.parse(n) for n in shipped_lattices(lattice_dir)]
    if not shipped:
        raise _no_lattices(lattice_dir)
    if not (math.isfinite(bits) and bits > 0):
        raise ValueError(f"--bits {bits}: must be > 0; shipped rates: {shipped_rates(shipped)}")
    exact = [s for s in shipped if abs(s.bits_per_weight - bits) <= BITS_TOLERANCE]
    if not exact:
        raise ValueError(
            f"--bits {bits:g}: no shipped lattice has exactly {bits:g} bits/weight; give one of "
            f"the shipped rates {shipped_rates(shipped)} (an average strictly between "
            f"{_format_rate(min(s.bits_per_weight for s in shipped))} and "
            f"{_format_rate(max(s.bits_per_weight for s in shipped))} is met by a per-layer mix), "
            "or --expc <D>to<d> for a lattice made with lattice_generator.py")
    device_type = _device_type(device)
    mse = recorded_mse(lattice_dir)
    if device_type == "cuda":
        spec = min(exact, key=lambda s: (mse.get(s.name, math.inf), s.lifted_dim))
        why = "best recorded MSE among equal-rate lattices (CUDA)"
    else:
        spec = min(exact, key=lambda s: (s.lifted_dim, mse.get(s.name, math.inf)))
        why = "smallest D among equal-rate lattices (CPU: search cost grows with D)"
    return spec, {"rule": "bits", "requested_bits": bits, "candidates": [s.name for s in exact],
                  "tie_break": why if len(exact) > 1 else None}


def _no_lattices(lattice_dir: str | Path | None) -> FileNotFoundError:
    return FileNotFoundError(f"no lattices in {lattice_dir or LATTICE_DIR}; give --lattice_dir a "
                             "folder of <D>to<d>.pt files, or run lattice_generator.py")


def _require_file(spec: LatticeSpec, lattice_dir: str | Path | None, *, what: str) -> LatticeSpec:
    if not lattice_path(spec, lattice_dir).is_file():
        shipped = shipped_lattices(lattice_dir)
        raise FileNotFoundError(
            f"{what} {spec.name}: no lattice file {lattice_path(spec, lattice_dir)}; shipped: "
            f"{', '.join(shipped) or 'none'}. Pick one with --expc, or generate it with: "
            f"python lattice_generator.py --expc {spec.name}")
    return spec


def select_lattice(
    *,
    expc: str | None,
    bits: float | None,
    target_size_gb: float | None,
    model: nn.Module | None = None,
    adapter: ModelAdapter | None = None,
    lattice_dir: str | Path | None = None,
    default: str = DEFAULT_LATTICE,
    device: str | torch.device | None = None,
    save_dtype: torch.dtype | None = None,
    mix_lattices: str | list[str] | None = None,
) -> tuple[LatticeSpec | None, dict]:
    """Resolve the rate; returns ``(spec, info)`` where info explains the choice.

    A uniform choice returns its lattice. A per-layer mix (``--target_size_gb``, or a ``--bits``
    average that no shipped lattice has exactly) returns ``(None, info)`` with ``info["mix"]``
    the request that :func:`plan_mix` fills once calibration data is at hand; the budget is
    checked here (with the model) against the smallest checkpoint the candidates allow.
    ``device`` (``--device``; None/"auto": CUDA when available) breaks ties and filters the mix
    candidates. Refuses, with the fix in the message, a lattice that is not there, a rate
    outside the shipped range, and a size budget no mix fits.
    """
    if expc:
        return _require_file(LatticeSpec.parse(expc), lattice_dir, what="--expc"), {"rule": "expc"}
    shipped = [LatticeSpec.parse(n) for n in shipped_lattices(lattice_dir)]
    if (bits is not None or target_size_gb is not None) and not shipped:
        raise _no_lattices(lattice_dir)
    if bits is not None:
        rates = [s.bits_per_weight for s in shipped]
        exact = any(abs(r - bits) <= BITS_TOLERANCE for r in rates)
        if exact or not (math.isfinite(bits) and min(rates) < bits < max(rates)):
            return lattice_for_bits(bits, lattice_dir=lattice_dir, device=device)
        cands = mix_candidates(lattice_dir, device, mix_lattices)
        lo, hi = cands[0].bits_per_weight, cands[-1].bits_per_weight
        if not lo <= bits <= hi:
            raise ValueError(f"--bits {bits:g}: the mix candidates {[c.name for c in cands]} "
                             f"span {_format_rate(lo)}..{_format_rate(hi)} bits/weight; give "
                             "--mix_lattices with lattices around it")
        return None, {"rule": "bits_average", "requested_bits": bits,
                      "mix": {"kind": "bits", "bits": bits,
                              "candidates": [c.name for c in cands]}}
    if target_size_gb is not None:
        if model is None or adapter is None:
            raise ValueError("--target_size_gb needs the model to size the checkpoint")
        cands = mix_candidates(lattice_dir, device, mix_lattices)
        sizes = {s.name: estimate_file_bytes(model, adapter, s, save_dtype=save_dtype)
                 for s in cands}
        smallest = min(cands, key=lambda s: sizes[s.name])
        if sizes[smallest.name] > target_size_gb * 1e9:
            least = sizes[smallest.name] / 1e9
            scale = 10.0 ** (math.floor(math.log10(least)) - 2)  # round up to 3 digits
            largest = max(cands, key=lambda s: sizes[s.name])
            raise ValueError(
                f"--target_size_gb {target_size_gb:g}: no shipped lattice fits, even as a per-layer "
                f"mix; "
                f"the smallest possible checkpoint is {least:.4g} GB ({smallest.name}, "
                f"{_format_rate(smallest.bits_per_weight)} bits/weight) and the largest "
                f"{sizes[largest.name] / 1e9:.4g} GB ({largest.name}): raise --target_size_gb "
                f"to at least {math.ceil(least / scale) * scale:.3g}")
        return None, {"rule": "target_size_gb", "target_size_gb": target_size_gb,
                      "uniform_size_gb": {k: round(v / 1e9, 6) for k, v in sizes.items()},
                      "mix": {"kind": "bytes", "budget_bytes": int(target_size_gb * 1e9),
                              "candidates": [c.name for c in cands]}}
    return _require_file(LatticeSpec.parse(default), lattice_dir,
                         what="default lattice (no --expc/--bits)"), {"rule": "default"}


def check_lattice_request(cfg) -> None:
    """Refuse, before the model loads, a ``--device`` that is not there and a ``--expc`` /
    ``--bits`` (or default) lattice that :func:`select_lattice` would refuse;
    ``--target_size_gb`` needs the model and is checked then. ``cfg`` is a
    :class:`liftquant.cli.config.RunConfig`."""
    lat = cfg.lattice
    _device_type(cfg.model.device)
    if lat.method != "liftquant":
        return
    mix = getattr(lat, "mix_lattices", None)
    if mix is not None:
        mix_candidates(lat.lattice_dir, cfg.model.device, mix)
    if lat.target_size_gb is None:
        select_lattice(expc=lat.expc, bits=lat.bits, target_size_gb=None,
                       lattice_dir=lat.lattice_dir, device=cfg.model.device, mix_lattices=mix)
    elif not shipped_lattices(lat.lattice_dir):
        raise _no_lattices(lat.lattice_dir)


# ------------------------------------------------------------------------- per-layer mixes
# On CPU a mix uses only lattices whose search costs at most this many candidate codes per
# weight (exhaustive: 2^D / d; pinv: 2^(D-d) x bases / d). 9to3 costs 171 and is the CPU
# demo's lattice (times in bench/demo/README.md); 24to8 (8192) did not finish a SmolLM2 block.
CPU_MIX_SEARCH_COST = 2048
# Calibration sequences of the FP pass that measures per-layer sensitivity.
SENSITIVITY_SAMPLES = 4


def search_cost(spec: LatticeSpec, device_type: str,
                lattice_dir: str | Path | None = None) -> float:
    """Candidate codes evaluated per weight by the default search of ``spec`` on the device."""
    D, d = spec.lifted_dim, spec.target_dim
    if spec.default_method(device_type) == "exhaustive":
        return 2.0 ** D / d
    return 2.0 ** (D - d) * search_bases(D, d, lattice_dir) / d


def mix_candidates(lattice_dir: str | Path | None = None,
                   device: str | torch.device | None = None,
                   names: str | list[str] | None = None) -> list[LatticeSpec]:
    """The lattices a per-layer mix may use, one per rate, sorted by rate.

    ``names`` (``--mix_lattices``, e.g. "12to6,9to3"): exactly those (each must be there and
    have a recorded MSE). Default: every shipped lattice with a recorded MSE, on CPU only those
    with :func:`search_cost` <= :data:`CPU_MIX_SEARCH_COST`; per rate the best MSE on CUDA and
    the cheapest search on CPU; a rate whose MSE is not below every lower rate's is dropped.
    """
    mse = mix_mse(lattice_dir)
    device_type = _device_type(device)
    if names:
        listed = names.split(",") if isinstance(names, str) else list(names)
        specs = [_require_file(LatticeSpec.parse(n.strip()), lattice_dir, what="--mix_lattices")
                 for n in listed if n.strip()]
        if not specs:
            raise ValueError(f"--mix_lattices {names!r}: name at least one lattice")
    else:
        specs = [LatticeSpec.parse(n) for n in shipped_lattices(lattice_dir)]
        if device_type == "cpu":
            specs = [s for s in specs
                     if search_cost(s, "cpu", lattice_dir) <= CPU_MIX_SEARCH_COST] or specs
        if not specs:
            raise _no_lattices(lattice_dir)
    by_rate: dict[float, LatticeSpec] = {}
    for s in specs:
        key = round(s.bits_per_weight, 6)
        best = by_rate.get(key)
        rank = ((lambda t: (search_cost(t, "cpu", lattice_dir), mse[t.name]))
                if device_type == "cpu" else (lambda t: (mse[t.name], t.lifted_dim)))
        if best is None or rank(s) < rank(best):
            by_rate[key] = s
    out: list[LatticeSpec] = []
    for key in sorted(by_rate):
        s = by_rate[key]
        if not out or mse[s.name] < mse[out[-1].name]:
            out.append(s)
    return out


def mix_mse(lattice_dir: str | Path | None = None) -> dict[str, float]:
    """Gaussian MSE per lattice for ranking a mix: recorded in ``index.json``, else (a lattice
    made without an index entry) the rate-distortion bound ``2^(-2 D/d)`` as a stand-in."""
    mse = recorded_mse(lattice_dir)
    for name in shipped_lattices(lattice_dir):
        mse.setdefault(name, 2.0 ** (-2 * LatticeSpec.parse(name).bits_per_weight))
    return mse


@dataclass
class LatticePlan:
    """A lattice per quantized linear: ``specs`` maps full module names to lattices."""

    specs: dict[str, LatticeSpec]
    weights: dict[str, int] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def lattices(self) -> list[LatticeSpec]:
        return sorted(set(self.specs.values()), key=lambda s: (s.bits_per_weight, s.lifted_dim))

    @property
    def uniform(self) -> LatticeSpec | None:
        lats = self.lattices
        return lats[0] if len(lats) == 1 else None

    @property
    def widest(self) -> LatticeSpec:
        """The lattice with the most bits per row (sizes the memory plan conservatively)."""
        return max(self.lattices, key=lambda s: (s.bits_per_weight, s.lifted_dim))

    @property
    def bits_per_weight(self) -> float:
        n = sum(self.weights.values())
        return sum(self.specs[k].bits_per_weight * w for k, w in self.weights.items()) / n

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(s.name for s in self.specs.values())
        return {s.name: c[s.name] for s in self.lattices}

    @property
    def name(self) -> str:
        if self.uniform is not None:
            return self.uniform.name
        return "mix(" + ",".join(f"{k}x{v}" for k, v in self.counts.items()) + ")"

    def summary(self) -> dict:
        return {"name": self.name, "bits_per_weight": round(self.bits_per_weight, 6),
                "counts": self.counts, **self.info,
                "module_lattices": {k: s.name for k, s in self.specs.items()}}


SENSITIVITY_PROXIES = ("fisher", "energy")


WEIGHT_ONLY = "||W||^2"  # the sensitivity without data (or a model too big for the pass)


def effective_proxy(model: nn.Module, calib_ids: torch.Tensor | None, *,
                    device: torch.device | str, proxy: str) -> str:
    """The proxy :func:`layer_sensitivity` applies: ``proxy``, or :data:`WEIGHT_ONLY` without
    calibration data or when the FP model does not fit the device for the pass."""
    if proxy not in SENSITIVITY_PROXIES:
        raise ValueError(f"unknown sensitivity proxy {proxy!r}; use one of {SENSITIVITY_PROXIES}")
    if calib_ids is None or not len(calib_ids) or not _fits(model, device):
        return WEIGHT_ONLY
    return proxy


def layer_sensitivity(model: nn.Module, adapter: ModelAdapter, calib_ids: torch.Tensor | None,
                      *, device: torch.device | str = "cpu",
                      n_samples: int = SENSITIVITY_SAMPLES,
                      proxy: str = "fisher") -> dict[str, float]:
    """Per quantized linear, the weight ``s_l`` of its lattice error in the mix (module doc).

    ``proxy="fisher"`` (default): ``s_l = sum_t mean_i(y_ti^2) * ||dL/dy_t||^2`` over the tokens
    ``t`` of the first ``n_samples`` calibration sequences, ``y`` the layer's FP output and ``L``
    each sequence's mean next-token loss: the expected loss increase of an output error whose
    energy per token is ``mse * mean_i(y_ti^2)`` (diagonal empirical Fisher in the layer's
    output space). ``proxy="energy"``: ``||W||_F^2 * mean(x^2)``, the layer's own output error
    with no regard for how much of it reaches the loss (late layers write into a larger
    residual stream and are over-weighted by it). Without ``calib_ids``, or for a model that
    does not fit half the free memory of a CUDA device (a 70B quantized block by block), both
    fall back to ``||W||_F^2``.
    """
    linears = quantized_linears(model, adapter)
    used = effective_proxy(model, calib_ids, device=device, proxy=proxy)
    if used == WEIGHT_ONLY:
        if calib_ids is not None and len(calib_ids):
            logger.warning("the FP model does not fit %s for the sensitivity pass; the per-layer "
                           "mix weighs layers by ||W||_F^2 alone", device)
        return {n: float(lin.weight.detach().float().square().sum()) for n, lin in linears.items()}
    rows = calib_ids[:n_samples]
    if proxy == "energy":
        return _energy_sensitivity(model, linears, rows, device)
    return _fisher_sensitivity(model, linears, rows, device)


@torch.no_grad()
def _energy_sensitivity(model, linears, rows, device) -> dict[str, float]:
    sums: dict[str, float] = {}

    def hook(_m, args, _name):
        sums[_name] = sums.get(_name, 0.0) + float(args[0].detach().float().square().mean())

    def register(lin, name):
        return lin.register_forward_pre_hook(lambda m, a: hook(m, a, name))

    with _hooked(linears, register), _on(model, device):
        for row in rows:
            model(row[None].to(device), use_cache=False)
    return {n: float(lin.weight.detach().float().square().sum()) * sums.get(n, 0.0) / len(rows)
            for n, lin in linears.items()}


def _fisher_sensitivity(model, linears, rows, device) -> dict[str, float]:
    sums = {n: 0.0 for n in linears}
    seen: set[str] = set()

    def hook(_m, _args, out, _name):
        if not out.requires_grad:
            return
        energy = out.detach().float().square().mean(-1)  # (batch, tokens): mean_i y_ti^2
        seen.add(_name)

        def on_grad(g, _name=_name, energy=energy):
            sums[_name] += float((energy * g.float().square().sum(-1)).sum())

        out.register_hook(on_grad)

    def register(lin, name):
        return lin.register_forward_hook(lambda m, a, o: hook(m, a, o, name))

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    emb = model.get_input_embeddings()
    start = emb.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True))
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with _hooked(linears, register), _on(model, device), torch.enable_grad():
            for row in rows:
                ids = row[None].to(device)
                logits = model(ids, use_cache=False).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                loss.backward()
    finally:
        start.remove()
        for p, req in frozen:
            p.requires_grad_(req)
    missing = [n for n in linears if n not in seen]
    if missing:  # e.g. experts that no calibration token reached
        logger.warning("%d quantized linears saw no gradient in the sensitivity pass (e.g. %s); "
                       "the per-layer mix weighs them by the median of the others", len(missing),
                       missing[0])
        vals = sorted(v for n, v in sums.items() if n in seen) or [1.0]
        for n in missing:
            sums[n] = vals[len(vals) // 2]
    return {n: max(v, 1e-30) for n, v in sums.items()}


@contextlib.contextmanager
def _hooked(linears: dict[str, nn.Module], register):
    """Context: ``register(linear, name)`` (returning a hook handle) on every linear."""
    handles = [register(lin, name) for name, lin in linears.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _on(model: nn.Module, device):
    """Context: ``model`` on ``device``, back on the CPU afterwards."""
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")


def _fits(model: nn.Module, device: torch.device | str) -> bool:
    """Whether the whole FP model fits in half the free memory of a CUDA ``device`` (CPU: yes)."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return sum(p.numel() * p.element_size() for p in model.parameters()) <= free / 2


def _greedy(names: list[str], cost: dict[str, list[float]], err: dict[str, list[float]],
            budget: float) -> tuple[dict[str, int], float, list[str]]:
    """Levels per layer from 0 up, taking the best error drop per extra cost that fits."""
    level = {n: 0 for n in names}
    spent = sum(cost[n][0] for n in names)
    heap: list[tuple[float, int, str]] = []

    def push(n: str) -> None:
        k = level[n]
        if k + 1 < len(cost[n]):
            extra = cost[n][k + 1] - cost[n][k]
            gain = err[n][k] - err[n][k + 1]
            ratio = math.inf if extra <= 0 else gain / extra
            heapq.heappush(heap, (-ratio, len(heap), n))

    for n in names:
        push(n)
    history = []
    while heap:
        _, _, n = heapq.heappop(heap)
        k = level[n]
        extra = cost[n][k + 1] - cost[n][k]
        if spent + extra > budget:
            continue  # this layer keeps its lattice; cheaper steps elsewhere may still fit
        level[n], spent = k + 1, spent + extra
        history.append(n)
        push(n)
    return level, spent, history


def plan_mix(model: nn.Module, adapter: ModelAdapter, request: dict, *,
             sensitivity: dict[str, float] | None = None,
             lattice_dir: str | Path | None = None,
             save_dtype: torch.dtype | None = None, proxy: str = "given") -> LatticePlan:
    """Fill ``request`` (``info["mix"]`` of :func:`select_lattice`) with a lattice per linear.

    ``kind == "bytes"``: the predicted ``model.safetensors`` (:mod:`liftquant.io.size`) is at most
    ``budget_bytes``; ``kind == "bits"``: the weight-averaged D/d of the quantized linears is at
    most ``bits``. Either way the unspent budget is smaller than any layer's next step.
    """
    levels = [LatticeSpec.parse(n) for n in request["candidates"]]
    mse = mix_mse(lattice_dir)
    linears = quantized_linears(model, adapter)
    names = list(linears)
    weights = {n: lin.in_features * lin.out_features for n, lin in linears.items()}
    sens = sensitivity or {n: 1.0 for n in names}
    err = {n: [sens[n] * mse[s.name] for s in levels] for n in names}
    if request["kind"] == "bits":
        cost = {n: [s.bits_per_weight * weights[n] for s in levels] for n in names}
        budget = request["bits"] * sum(weights.values()) * (1 + 1e-12)
    else:
        cost = {n: [float(tensor_bytes(packed_tensors(
            lin.in_features, lin.out_features, s, bias=lin.bias is not None))) for s in levels]
            for n, lin in linears.items()}
        floor = checkpoint_tensors(model, adapter, levels[0], save_dtype=save_dtype)
        dense = {k: v for k, v in floor.items() if k.rsplit(".", 1)[0] not in linears}
        fixed = tensor_bytes(dense) + header_bytes(floor)
        budget = request["budget_bytes"] - fixed
    level, _, history = _greedy(names, cost, err, budget)
    specs = {n: levels[level[n]] for n in names}
    if request["kind"] == "bytes":  # the header's offsets may grow a few bytes: undo to fit
        while history and estimate_file_bytes(model, adapter, specs,
                                              save_dtype=save_dtype) > request["budget_bytes"]:
            n = history.pop()
            level[n] -= 1
            specs[n] = levels[level[n]]
    expected = estimate_file_bytes(model, adapter, specs, save_dtype=save_dtype)
    steps = [cost[n][level[n] + 1] - cost[n][level[n]] for n in names
             if level[n] + 1 < len(levels)]
    info = {"proxy": f"mse(lattice) * sensitivity ({proxy}), greedy per byte",
            "candidates": [s.name for s in levels],
            "expected_bytes": expected, "expected_size_gb": round(expected / 1e9, 6),
            "expected_error": sum(err[n][level[n]] for n in names),
            "smallest_next_step": min(steps) if steps else None}
    if request["kind"] == "bytes":
        info["budget_bytes"] = request["budget_bytes"]
        info["unspent_bytes"] = request["budget_bytes"] - expected
    else:
        info["requested_bits"] = request["bits"]
    return LatticePlan(specs=specs, weights=weights, info=info)
