"""Rate selection: ``--expc``, ``--bits`` (a shipped lattice of exactly that rate) or
``--target_size_gb`` (the highest-rate shipped lattice whose whole checkpoint fits; SPEC §1
"fit the memory budget").

``--bits X`` is honoured exactly or refused (:func:`lattice_for_bits`): X must equal a shipped
lattice's D/d within :data:`BITS_TOLERANCE`. Among lattices of equal rate (9to3 and 24to8 are
both 3 bits) the one practical on the device is taken: on CUDA the best Gaussian MSE recorded
in ``lattice/index.json``; on CPU the smallest D, because the search cost grows as 2^D or
2^(D-d) (measured on the 2-core CPU: 9to3 quantizes a SmolLM2 block in ~2 s, 24to8 did not
finish one block in 2 min).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from liftquant.checkpoint import unique_state
from liftquant.lattice import LATTICE_DIR, LatticeSpec, lattice_path, shipped_lattices
from liftquant.linear import SIDE_DTYPE, lifted_width
from liftquant.models.adapters import ModelAdapter
from liftquant.whiten import block_shape

DEFAULT_LATTICE = "20to8"  # 2.5 bits: the authors' recommendation for ~30B models
BITS_TOLERANCE = 1e-6  # --bits must equal a shipped D/d this closely (15/7 = 2.142857...)
_SIDE_BYTES = SIDE_DTYPE.itemsize if hasattr(SIDE_DTYPE, "itemsize") else 2


def quantized_linear_bytes(in_features: int, out_features: int, spec: LatticeSpec,
                           *, bias: bool) -> int:
    """Bytes a PackedLiftLinear stores: packed codes + scale, s1, L, R, s2_act (+ bias)."""
    d, D = spec.target_dim, spec.lifted_dim
    n1, n2 = block_shape(in_features, d)
    codes = out_features * ((lifted_width(in_features, spec) + 7) // 8)
    side = out_features + in_features + n1 * n1 + n2 * (n2 // d) * D + n1 * (n2 // d)
    return codes + _SIDE_BYTES * (side + (out_features if bias else 0))


def estimate_checkpoint_bytes(model: nn.Module, adapter: ModelAdapter, spec: LatticeSpec) -> int:
    """Size of the quantized checkpoint's tensors for ``model`` at ``spec`` (tied head once)."""
    quantized = set()
    total = 0
    for block_name, block in _named_blocks(model, adapter):
        for name in adapter.linear_names(block):
            lin = adapter.get_linear(block, name)
            quantized.add(f"{block_name}.{name}.weight")
            quantized.add(f"{block_name}.{name}.bias")
            total += quantized_linear_bytes(lin.in_features, lin.out_features, spec,
                                            bias=lin.bias is not None)
    for key, t in unique_state(model).items():  # persistent tensors, tied ones once, as saved
        if key not in quantized:
            total += t.numel() * t.element_size()
    return total


def _named_blocks(model, adapter):
    blocks = adapter.get_blocks(model)
    return [(f"{adapter.blocks}.{i}", b) for i, b in enumerate(blocks)]


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
            f"the shipped rates {shipped_rates(shipped)}, or --expc <D>to<d> for a lattice made "
            "with lattice_generator.py")
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
) -> tuple[LatticeSpec, dict]:
    """Resolve the lattice; returns ``(spec, info)`` where info explains the choice.

    ``device`` (``--device``; None/"auto": CUDA when available) breaks ties of ``bits``.
    Refuses, with the fix in the message, a lattice that is not there, a rate no shipped lattice
    has, and a size budget no shipped lattice fits.
    """
    if expc:
        return _require_file(LatticeSpec.parse(expc), lattice_dir, what="--expc"), {"rule": "expc"}
    if bits is not None:
        return lattice_for_bits(bits, lattice_dir=lattice_dir, device=device)
    shipped = [LatticeSpec.parse(n) for n in shipped_lattices(lattice_dir)]
    if not shipped and target_size_gb is not None:
        raise _no_lattices(lattice_dir)
    if target_size_gb is not None:
        if model is None or adapter is None:
            raise ValueError("--target_size_gb needs the model to size the checkpoint")
        sizes = {s.name: estimate_checkpoint_bytes(model, adapter, s) for s in shipped}
        fitting = [s for s in shipped if sizes[s.name] <= target_size_gb * 1e9]
        if not fitting:
            smallest = min(shipped, key=lambda s: sizes[s.name])
            least = sizes[smallest.name] / 1e9
            scale = 10.0 ** (math.floor(math.log10(least)) - 2)  # round up to 3 digits
            raise ValueError(
                f"--target_size_gb {target_size_gb:g}: no shipped lattice fits; the smallest "
                f"possible checkpoint is {least:.4g} GB ({smallest.name}, "
                f"{_format_rate(smallest.bits_per_weight)} bits/weight): raise --target_size_gb "
                f"to at least {math.ceil(least / scale) * scale:.3g}")
        spec = max(fitting, key=lambda s: (s.bits_per_weight, s.lifted_dim))
        return spec, {"rule": "target_size_gb", "target_size_gb": target_size_gb,
                      "estimated_size_gb": sizes[spec.name] / 1e9}
    return _require_file(LatticeSpec.parse(default), lattice_dir,
                         what="default lattice (no --expc/--bits)"), {"rule": "default"}


def check_lattice_request(cfg) -> None:
    """Refuse, before the model loads, a ``--device`` that is not there and a ``--expc`` /
    ``--bits`` (or default) lattice that :func:`select_lattice` would refuse;
    ``--target_size_gb`` needs the model and is checked then. ``cfg`` is a
    :class:`liftquant.config.RunConfig`."""
    lat = cfg.lattice
    _device_type(cfg.model.device)
    if lat.method != "liftquant":
        return
    if lat.target_size_gb is None:
        select_lattice(expc=lat.expc, bits=lat.bits, target_size_gb=None,
                       lattice_dir=lat.lattice_dir, device=cfg.model.device)
    elif not shipped_lattices(lat.lattice_dir):
        raise _no_lattices(lat.lattice_dir)
