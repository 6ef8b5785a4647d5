"""transformers integration: ``AutoModelForCausalLM.from_pretrained(liftquant_checkpoint)``.

``import liftquant`` calls :func:`register` (guarded: a transformers version whose quantizer API
differs only logs a warning), which registers

* :class:`LiftQuantConfig` for ``quantization_config.quant_method == "liftquant"`` and
* :class:`LiftQuantHfQuantizer`, whose ``_process_model_before_weight_loading`` swaps every module
  listed in ``quantized_modules`` for a meta-device :class:`~liftquant.core.linear.PackedLiftLinear`
  (:func:`liftquant.io.checkpoint.swap_packed`, the swap ``load_quantized`` uses too), so
  transformers then loads the packed signs, scales and fused transform buffers straight from
  ``model.safetensors``.

Before any weight is read, the quantizer applies the checks of ``load_quantized``
(:mod:`liftquant.io.integrity`): ``config.json`` fields (format version, pack layout, lattice,
module list), the per-tensor SHA-256 of ``model.safetensors`` (``LIFTQUANT_VERIFY=0`` skips
the hashing), and the file's tensor names and shapes against the swapped skeleton, including
packed codes for exactly the listed modules; after loading it refuses non-finite tensors and
tensors transformers left uninitialised. Refusals are :class:`CheckpointError`.

The result matches :func:`liftquant.load_quantized` (which stays the reference loader and
additionally takes ``backend=``); the kernel backend of a ``from_pretrained`` model is "auto"
(Triton on CUDA, torch on CPU); call :func:`liftquant.kernels.set_backend` afterwards to pick
another (transformers ignores a ``quantization_config`` passed to ``from_pretrained`` when the
checkpoint has one). Packed models are inference-only
(``is_trainable`` is False); ``save_pretrained`` is refused (use
:func:`liftquant.io.checkpoint.save_quantized`).

Uses only hooks present in transformers 5.x: ``register_quantization_config``,
``register_quantizer``, ``HfQuantizer.{_process_model_before_weight_loading,
_process_model_after_weight_loading, is_serializable, is_trainable, validate_environment}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from liftquant.io.checkpoint import (
    NONFINITE_FIX,
    QUANT_METHOD,
    CheckpointError,
    check_quantization_config,
    expected_shapes,
    swap_packed,
    tied_keys,
)
from liftquant.io.integrity import (
    CHECKSUM_ALGO,
    check_finite,
    check_tensors,
    read_header,
    verify_checksums,
    verify_default,
)
from liftquant.util.log import get_logger

logger = get_logger("hf")

_REGISTERED: dict[str, Any] = {}


def _define_classes() -> tuple[type, type]:
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class LiftQuantConfig(QuantizationConfigMixin):
        """The ``quantization_config`` block of a LiftQuant ``config.json`` (all keys kept)."""

        def __init__(self, quantized_modules: list[str] | None = None,
                     modules_to_not_convert: list[str] | None = None, backend: str = "auto",
                     **kwargs: Any) -> None:
            kwargs.pop("quant_method", None)
            self.quant_method = QUANT_METHOD
            self.quantized_modules = list(quantized_modules or [])
            self.modules_to_not_convert = list(modules_to_not_convert or [])
            self.backend = backend
            for key, value in kwargs.items():
                setattr(self, key, value)

        def to_dict(self) -> dict[str, Any]:
            out = {k: v for k, v in self.__dict__.items() if k != "backend"}
            out["quant_method"] = QUANT_METHOD
            return out

    class LiftQuantHfQuantizer(HfQuantizer):
        """Swaps target linears for ``PackedLiftLinear`` before transformers loads weights."""

        requires_calibration = True  # only pre-quantized LiftQuant checkpoints can be loaded

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            if not self.pre_quantized:
                raise ValueError("LiftQuant quantizes with `python main.py`, not on the fly in "
                                 "from_pretrained: pass a LiftQuant checkpoint folder")

        def _process_model_before_weight_loading(self, model: Any, *,
                                                 checkpoint_files: list[str] | None = None,
                                                 **kwargs: Any) -> Any:
            files = [Path(f) for f in checkpoint_files or ()]
            if not files or any(f.suffix != ".safetensors" for f in files):
                raise CheckpointError(f"LiftQuant checkpoints load from model.safetensors in "
                                      f"their folder (got {[str(f) for f in files]}); pass the "
                                      "checkpoint folder to from_pretrained")
            qd = check_quantization_config(self.quantization_config.to_dict(),
                                           where=files[0].parent / "config.json")
            self._swap_packed(model, qd)
            headers = {f: read_header(f) for f in files}
            if verify_default():
                for f, header in headers.items():
                    verify_checksums(f, header, declared=qd.get("tensor_checksums") == CHECKSUM_ALGO)
            merged = {"tensors": {k: e for h in headers.values() for k, e in h["tensors"].items()}}
            self._weights = files[0] if len(files) == 1 else files[0].parent
            expected = expected_shapes(model)
            check_tensors(self._weights, merged, expected, quantized_modules=qd["quantized_modules"],
                          tied=tied_keys(model.config, expected))
            return model

        def _swap_packed(self, model: Any, qd: dict[str, Any]) -> None:
            swap_packed(model, qd, backend=getattr(self.quantization_config, "backend", "auto"))

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            from liftquant.kernels.registry import set_backend

            state = model.state_dict()
            offloaded = "disk" in set((getattr(model, "hf_device_map", None) or {}).values())
            unset = sorted(k for k, t in state.items() if t.device.type == "meta")
            if unset and not offloaded:  # disk-offloaded weights stay on meta by design
                raise CheckpointError(f"{self._weights}: tensor {unset[0]!r} (and {len(unset) - 1} "
                                      "more) was not restored by from_pretrained; re-save or "
                                      "re-download the checkpoint")
            check_finite(state.items(), where=str(self._weights), fix=NONFINITE_FIX)
            model.requires_grad_(False)
            n = set_backend(model, getattr(self.quantization_config, "backend", "auto"))
            logger.info("from_pretrained: %d packed LiftQuant layers", n)
            return model

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    return LiftQuantConfig, LiftQuantHfQuantizer


def register() -> bool:
    """Register the config and quantizer with transformers (idempotent); False if impossible."""
    if _REGISTERED:
        return True
    try:
        from transformers.quantizers.auto import (
            AUTO_QUANTIZATION_CONFIG_MAPPING,
            AUTO_QUANTIZER_MAPPING,
            register_quantization_config,
            register_quantizer,
        )

        config_cls, quantizer_cls = _define_classes()
        if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
            register_quantization_config(QUANT_METHOD)(config_cls)
        if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
            register_quantizer(QUANT_METHOD)(quantizer_cls)
    except Exception as exc:  # noqa: BLE001 - an optional integration must not break import
        logger.warning("liftquant: could not register the transformers quantizer (%s: %s); "
                       "use liftquant.load_quantized(path) instead", type(exc).__name__, exc)
        return False
    _REGISTERED.update(config=AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD],
                       quantizer=AUTO_QUANTIZER_MAPPING[QUANT_METHOD])
    return True


def __getattr__(name: str) -> Any:  # LiftQuantConfig / LiftQuantHfQuantizer after register()
    key = {"LiftQuantConfig": "config", "LiftQuantHfQuantizer": "quantizer"}.get(name)
    if key is not None and register():
        return _REGISTERED[key]
    raise AttributeError(name)
