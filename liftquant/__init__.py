"""LiftQuant: lattice-lifted 1-bit weight quantization.

``import liftquant`` is cheap: it imports neither torch nor transformers. The public names below
are re-exported lazily (module ``__getattr__``), so ``liftquant.load_quantized`` imports the
checkpoint code on first use and ``import liftquant.core.pack`` pulls in torch only.

The package is layered (ARCHITECTURE.md): ``util`` < ``core`` / ``kernels`` / ``models`` <
``cli`` / ``demo`` < ``io`` < ``quantize`` / ``evaluation`` < ``apps`` / ``engine``.
The flat module paths of earlier releases (``liftquant.lattice``, ``liftquant.checkpoint``,
...) still import: a meta-path finder maps each to its new module and returns the very same
module object (``liftquant.lattice is liftquant.core.lattice``), and ``python -m`` on an old
path runs the new module. Code in this repository uses the new paths (tests/test_layout.py).

The ``quant_method: "liftquant"`` quantizer is registered with transformers (see
:mod:`liftquant.io.hf`) as soon as transformers is imported -- at once when it already
is, else by a one-shot import hook -- so ``AutoModelForCausalLM.from_pretrained(checkpoint)``
loads packed checkpoints after ``import liftquant`` without this module importing
transformers. The registration is guarded: if it fails (its quantizer API changed), a warning
is logged and ``liftquant.load_quantized`` still works.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# public name -> module that defines it (imported on first attribute access)
_EXPORTS = {
    "LatticeSpec": "liftquant.core.latticespec",
    "load_projection": "liftquant.core.lattice",
    "encode": "liftquant.core.lattice",
    "decode": "liftquant.core.lattice",
    "pack_signs": "liftquant.core.pack",
    "unpack_signs": "liftquant.core.pack",
    "LiftLinear": "liftquant.core.linear",
    "PackedLiftLinear": "liftquant.core.linear",
    "RunConfig": "liftquant.cli.config",
    "quantize_model": "liftquant.quantize.calibrate",
    "save_quantized": "liftquant.io.checkpoint",
    "load_quantized": "liftquant.io.checkpoint",
    "load_checkpoint": "liftquant.quantize.methods",
    "get_method": "liftquant.quantize.methods",
    "perplexity": "liftquant.evaluation.eval",
}
__all__ = [*_EXPORTS]  # noqa: PLE0604 - resolved by __getattr__

# old flat path (relative to liftquant) -> its module in the layered package; a package entry
# (integrations) also maps everything below it
MOVED = {
    **{m: f"util.{m}" for m in ("log", "fileio", "errors", "records", "provenance")},
    **{m: f"core.{m}" for m in ("latticespec", "lattice", "lattice_train", "hadamard", "whiten",
                                "linear", "pack", "proxy")},
    **{m: f"cli.{m}" for m in ("config", "finetune_config")},
    "assets": "demo.assets",
    **{m: f"io.{m}" for m in ("integrity", "checkpoint", "size")},
    "integrations": "io",
    "integrations.hf": "io.hf",
    **{m: f"quantize.{m}" for m in ("methods", "cache", "capture", "stream", "blocktrain", "plan",
                                    "blockstore", "calibrate", "rate", "distributed",
                                    "baselines")},
    **{m: f"evaluation.{m}" for m in ("data", "eval", "lmeval", "tasks", "pareto")},
    **{m: f"apps.{m}" for m in ("api", "finetune", "chat")},
}


def _new_name(old: str) -> str | None:
    """``liftquant.<old path>`` -> ``liftquant.<new path>``, or None when the name did not move."""
    rel = old.removeprefix(__name__ + ".")
    if rel == old:
        return None
    if rel in MOVED:
        return f"{__name__}.{MOVED[rel]}"
    head, _, tail = rel.partition(".")
    if tail and head in MOVED and "." not in MOVED[head]:  # below a moved package
        return f"{__name__}.{MOVED[head]}.{tail}"
    return None


class _AliasLoader(importlib.abc.Loader):
    """Loads an old path as the module of its new path (the same object, not a copy)."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass  # the new module is already executed

    def _target_loader(self):
        return importlib.util.find_spec(self.target).loader

    # `python -m liftquant.<old path>` (runpy) runs the new module's code as __main__
    def get_code(self, fullname):
        return self._target_loader().get_code(self.target)

    def is_package(self, fullname):
        return self._target_loader().is_package(self.target)


class _OldPathFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder for the flat module paths of earlier releases (see ``MOVED``)."""

    def find_spec(self, name, path=None, target=None):
        new = _new_name(name)
        if new is None:
            return None
        real = importlib.util.find_spec(new)
        if real is None:
            return None
        return importlib.util.spec_from_loader(name, _AliasLoader(new), origin=real.origin,
                                               is_package=real.submodule_search_locations
                                               is not None)


if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _OldPathFinder())


def _register_hf() -> None:
    try:
        from liftquant.io.hf import register
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
