"""LiftQuant: lattice-lifted 1-bit weight quantization.

``import liftquant`` is cheap: it imports neither torch nor transformers. The public names below
are re-exported lazily (module ``__getattr__``), so ``liftquant.load_quantized`` imports the
checkpoint code on first use and ``import liftquant.pack`` pulls in torch only.

The ``quant_method: "liftquant"`` quantizer is registered with transformers (see
:mod:`liftquant.integrations.hf`) as soon as transformers is imported -- at once when it already
is, else by a one-shot import hook -- so ``AutoModelForCausalLM.from_pretrained(checkpoint)``
loads packed checkpoints after ``import liftquant`` without this module importing
transformers. The registration is guarded: if it fails (its quantizer API changed), a warning
is logged and ``liftquant.load_quantized`` still works.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

# public name -> module that defines it (imported on first attribute access)
_EXPORTS = {
    "LatticeSpec": "liftquant.latticespec",
    "load_projection": "liftquant.lattice",
    "encode": "liftquant.lattice",
    "decode": "liftquant.lattice",
    "pack_signs": "liftquant.pack",
    "unpack_signs": "liftquant.pack",
    "LiftLinear": "liftquant.linear",
    "PackedLiftLinear": "liftquant.linear",
    "RunConfig": "liftquant.config",
    "quantize_model": "liftquant.calibrate",
    "save_quantized": "liftquant.checkpoint",
    "load_quantized": "liftquant.checkpoint",
    "load_checkpoint": "liftquant.methods",
    "get_method": "liftquant.methods",
    "perplexity": "liftquant.eval",
}
__all__ = [*_EXPORTS]  # noqa: PLE0604 - resolved by __getattr__


def _register_hf() -> None:
    try:
        from liftquant.integrations.hf import register
    except Exception as exc:  # noqa: BLE001 - never break `import liftquant`
        import logging

        logging.getLogger("liftquant").warning(
            "liftquant: transformers integration unavailable (%s: %s)", type(exc).__name__, exc)
        return
    register()


class _RegisterAfterTransformers:
    """Meta-path finder that lets the real finder load ``transformers`` and then registers the
    LiftQuant quantizer with it; it removes itself on first use."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_hf()

        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register_hf()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'liftquant' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
