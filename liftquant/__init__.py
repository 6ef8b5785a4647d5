"""LiftQuant: lattice-lifted 1-bit weight quantization.

Importing the package registers the ``quant_method: "liftquant"`` quantizer with transformers
(see :mod:`liftquant.integrations.hf`), so ``AutoModelForCausalLM.from_pretrained(checkpoint)``
loads packed checkpoints. The registration is guarded: if it fails (transformers missing or its
quantizer API changed), a warning is logged and ``liftquant.load_quantized`` still works.
"""

from __future__ import annotations


def _register_hf() -> None:
    try:
        from liftquant.integrations.hf import register
    except Exception as exc:  # noqa: BLE001 - never break `import liftquant`
        import logging

        logging.getLogger("liftquant").warning(
            "liftquant: transformers integration unavailable (%s: %s)", type(exc).__name__, exc)
        return
    register()


_register_hf()


def __getattr__(name: str):
    if name == "load_quantized":
        from liftquant.checkpoint import load_quantized

        return load_quantized
    raise AttributeError(f"module 'liftquant' has no attribute {name!r}")
