"""One registry of quantization methods: config type -> handler (as torchao's
``register_quantize_module_handler``), and the one loader that dispatches on a checkpoint's
``quantization_config.quant_method``.

A :class:`QuantMethod` bundles what the pipeline needs from a method:

* ``config_type`` and ``make_config(cfg, model, adapter) -> (config, M, rate_info)``: the
  method's own config built from the run config (a :class:`~liftquant.core.latticespec.LatticeSpec`
  for LiftQuant, a :class:`~liftquant.quantize.baselines.BaselineSpec` for RTN/GPTQ; ``M`` is the lattice
  matrix or None);
* ``quantize(model, calib, *, cfg, spec, M, adapter, device, **run) -> (rows, bits, qc,
  tensors)``: quantize in place and return the report rows, the bits report, the
  ``quantization_config`` and the tensors to save (None: the model's own state);
* ``quantization_config``: the function that writes the checkpoint's ``quantization_config``;
* ``load(path, *, device, dtype, backend) -> (model, tokenizer)``: rebuild a saved checkpoint
  (every loader ends in :func:`liftquant.io.checkpoint.strict_load`).

``--method`` names (``liftquant``, ``rtn``, ``gptq``) select a handler; RTN and GPTQ share one
(their config type, checkpoint format and loader are the same). The built-in handlers register
themselves in :mod:`liftquant.apps.api` (LiftQuant) and :mod:`liftquant.quantize.baselines` (RTN, GPTQ), which
are imported on the first lookup, so importing this module stays cheap.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# modules whose import registers the built-in methods
BUILTIN_MODULES = ("liftquant.apps.api", "liftquant.quantize.baselines")


@dataclass(frozen=True)
class QuantMethod:
    quant_method: str  # config.json quantization_config.quant_method of its checkpoints
    names: tuple[str, ...]  # --method values
    config_type: type
    make_config: Callable[..., tuple[Any, Any, dict]]
    quantize: Callable[..., tuple[list, dict, dict, Any]]
    quantization_config: Callable[..., dict[str, Any]]
    load: Callable[..., tuple[Any, Any]]
    needs_calibration: Callable[[str], bool] = lambda name: True


_METHODS: list[QuantMethod] = []


def register_method(method: QuantMethod) -> QuantMethod:
    """Add ``method`` (a later registration of the same ``quant_method`` replaces it)."""
    _METHODS[:] = [m for m in _METHODS if m.quant_method != method.quant_method]
    _METHODS.append(method)
    return method


def _registered() -> list[QuantMethod]:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return _METHODS


def method_names() -> list[str]:
    """Every ``--method`` name, sorted (registration order depends on import order)."""
    return sorted(n for m in _registered() for n in m.names)


def get_method(name: str) -> QuantMethod:
    """The handler of ``--method name``."""
    for m in _registered():
        if name in m.names:
            return m
    raise ValueError(f"--method {name!r}: choose one of {', '.join(method_names())}")


def method_for_config(config: Any) -> QuantMethod:
    """The handler whose ``config_type`` ``config`` is (e.g. a LatticeSpec -> LiftQuant)."""
    for m in _registered():
        if isinstance(config, m.config_type):
            return m
    raise TypeError(f"no quantization method is registered for {type(config).__name__}")


def method_for_checkpoint(qc: dict[str, Any], *, where: str | Path) -> QuantMethod:
    """The handler of a checkpoint's ``quantization_config`` (by ``quant_method``)."""
    found = qc.get("quant_method")
    for m in _registered():
        if m.quant_method == found:
            return m
    known = ", ".join(sorted(repr(m.quant_method) for m in _METHODS))
    raise ValueError(f"{where}: quant_method {found!r} is none of {known}; pass an FP model "
                     "with --model instead")


def load_checkpoint(path: str | Path, *, device: Any = "cpu", dtype: Any = None,
                    backend: str = "auto") -> tuple[Any, Any]:
    """Load any registered checkpoint (LiftQuant or a baseline), chosen by its
    ``quant_method``; returns ``(model, tokenizer)``."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: is {path} a checkpoint folder?")
    qc = json.loads(cfg_file.read_text()).get("quantization_config") or {}
    method = method_for_checkpoint(qc, where=path)
    return method.load(path, device=device, dtype=dtype, backend=backend)
