"""Rate selection: ``--expc``, ``--bits`` (nearest shipped lattice) or ``--target_size_gb``
(the highest-rate shipped lattice whose whole checkpoint fits; SPEC §1 "fit the memory budget").
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from liftquant.checkpoint import unique_state
from liftquant.lattice import LatticeSpec, shipped_lattices
from liftquant.linear import SIDE_DTYPE, lifted_width
from liftquant.models.adapters import ModelAdapter
from liftquant.whiten import block_shape

DEFAULT_LATTICE = "20to8"  # 2.5 bits: the authors' recommendation for ~30B models
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


def select_lattice(
    *,
    expc: str | None,
    bits: float | None,
    target_size_gb: float | None,
    model: nn.Module | None = None,
    adapter: ModelAdapter | None = None,
    lattice_dir: str | Path | None = None,
    default: str = DEFAULT_LATTICE,
) -> tuple[LatticeSpec, dict]:
    """Resolve the lattice; returns ``(spec, info)`` where info explains the choice."""
    if expc:
        return LatticeSpec.parse(expc), {"rule": "expc"}
    shipped = [LatticeSpec.parse(n) for n in shipped_lattices(lattice_dir)]
    if not shipped and (bits is not None or target_size_gb is not None):
        raise FileNotFoundError("no shipped lattices found; run lattice_generator.py")
    if bits is not None:
        spec = min(shipped, key=lambda s: (abs(s.bits_per_weight - bits), -s.lifted_dim))
        return spec, {"rule": "bits", "requested_bits": bits}
    if target_size_gb is not None:
        if model is None or adapter is None:
            raise ValueError("--target_size_gb needs the model to size the checkpoint")
        sizes = {s.name: estimate_checkpoint_bytes(model, adapter, s) for s in shipped}
        fitting = [s for s in shipped if sizes[s.name] <= target_size_gb * 1e9]
        if not fitting:
            smallest = min(shipped, key=lambda s: sizes[s.name])
            raise ValueError(
                f"no shipped lattice fits {target_size_gb} GB: the smallest checkpoint is "
                f"{sizes[smallest.name] / 1e9:.3f} GB ({smallest.name}); raise --target_size_gb")
        spec = max(fitting, key=lambda s: (s.bits_per_weight, s.lifted_dim))
        return spec, {"rule": "target_size_gb", "target_size_gb": target_size_gb,
                      "estimated_size_gb": sizes[spec.name] / 1e9}
    return LatticeSpec.parse(default), {"rule": "default"}
