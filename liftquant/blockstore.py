"""Per-block result files under ``<save_dir>/blocks/`` (STYLE §2.7: resume).

A finished block is written as ``block_XXX.safetensors`` (its packed state dict) plus
``block_XXX.json`` (its report row). The ``.safetensors`` file is renamed into place last, so
its presence marks the block as finished; ``--resume`` reloads such blocks instead of
recomputing them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from liftquant.lattice import LatticeSpec
from liftquant.linear import PackedLiftLinear
from liftquant.models.adapters import ModelAdapter


def block_file(blocks_dir: Path | None, i: int) -> Path | None:
    """Path of block ``i``'s result file (None when no blocks folder is used)."""
    return None if blocks_dir is None else blocks_dir / f"block_{i:03d}.safetensors"


def swap_to_packed(block: nn.Module, adapter: ModelAdapter, spec: LatticeSpec,
                   *, names: list[str] | None = None) -> None:
    """Replace the block's group linears by empty ``PackedLiftLinear`` skeletons."""
    for name in names or adapter.linear_names(block):
        lin = adapter.get_linear(block, name)
        adapter.set_module(block, name, PackedLiftLinear(
            lin.in_features, lin.out_features, spec=spec, bias=lin.bias is not None,
            device=lin.weight.device))


def save_block(path: Path, block: nn.Module, row: dict, *, fingerprint: dict | None = None) -> None:
    """Write block ``path`` atomically: JSON row first, the ``.safetensors`` marker last."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in block.state_dict().items()},
              str(tmp))
    path.with_suffix(".json.tmp").write_text(json.dumps(row))
    os.replace(path.with_suffix(".json.tmp"), path.with_suffix(".json"))
    os.replace(tmp, path)  # the .safetensors appears last: it marks the block as finished


def is_finished(path: Path | None) -> bool:
    """True when block ``path`` was finished by an earlier run."""
    return path is not None and path.is_file()


def load_finished_block(block: nn.Module, path: Path, *, adapter: ModelAdapter,
                        spec: LatticeSpec, backend: str, device: torch.device,
                        fingerprint: dict | None = None) -> dict:
    """Resume: swap in packed skeletons, load the saved block strictly, return its report row."""
    swap_to_packed(block, adapter, spec)
    block.load_state_dict({k: v.to(device) for k, v in load_file(str(path)).items()}, strict=True)
    for m in block.modules():
        if isinstance(m, PackedLiftLinear):
            m.backend = backend
    return json.loads(path.with_suffix(".json").read_text())
