"""Generation engines behind one interface: ``prefill(ids) -> logits``, ``next(token) ->
logits``, ``warm_up()``, ``reset()`` (:class:`Engine`).

* ``step`` (:class:`StepEngine`): our own decode step (``engine.step``) over a static KV cache,
  module paths from the model adapter, batched prefill, sibling groups (``engine.groups``),
  one CUDA graph per token on CUDA (``engine.graph``); Llama-layout families.
* ``hf`` (:class:`~liftquant.engine.hf.HFEngine`): the model's forward with a transformers
  ``StaticCache``; any architecture.

:func:`build_engine` picks one (``auto``: step on CUDA where the layout fits, else hf);
:func:`prepare_model` applies the device-specific kernel choices that are made per model, not
per call: on the CPU the dense weight cache when it fits (``kernels.dense``), logged.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
from torch import Tensor, nn

from liftquant.engine.hf import HFEngine
from liftquant.engine.step import DecodeStep, StepLayout, step_layout
from liftquant.kernels.policy import KernelPolicy

__all__ = ["DecodeStep", "Engine", "HFEngine", "StepEngine", "StepLayout", "build_engine",
           "prepare_model", "step_layout"]
ENGINES = ("auto", "step", "hf")


class Engine(Protocol):
    name: str

    def prefill(self, ids: Tensor) -> Tensor: ...

    def next(self, token: Tensor) -> Tensor: ...

    def warm_up(self, prompt_len: int = 16, steps: int = 4) -> float: ...

    def reset(self) -> None: ...


class StepEngine:
    """:class:`DecodeStep` behind the engine interface; on CUDA with ``compile`` the step is
    captured as one CUDA graph (on the first decode step or in :meth:`warm_up`)."""

    name = "step"

    def __init__(self, model: nn.Module, max_len: int, *, compile: bool = False,
                 device: torch.device | None = None, group: bool = True,
                 host_embed: bool = False) -> None:
        self.step = DecodeStep(model, max_len, compile_mode="default" if compile else None,
                               group=group, host_embed=host_embed)
        self.device = device or self.step.zero.device  # not the embedding's: it may be host
        self.use_graph = compile and self.device.type == "cuda"
        self.graph = None

    def reset(self) -> None:
        self.step.pos.zero_()  # slots past pos are masked: no clearing needed

    def prefill(self, ids: Tensor) -> Tensor:
        """A fresh context from ``ids`` (1, T) in one batched pass: logits (1, V)."""
        return self.step.prefill(ids)[:, -1, :]

    def capture(self) -> None:
        """Eager steps (kernel tuning, workspaces) then the CUDA-graph capture; the position
        is kept (the warm-up writes only masked cache slots past it)."""
        from liftquant.engine.graph import GraphedDecode

        pos = self.step.pos.clone()
        self.graph = GraphedDecode(self.step, warmup=3)
        self.step.pos.copy_(pos)

    def next(self, token: Tensor) -> Tensor:
        """Feed ``token`` at the step's position: logits (1, V), a fresh tensor (the graph's
        static output buffer is copied, so earlier results are not overwritten by later steps)."""
        if self.use_graph and self.graph is None:
            self.capture()
        self.step.ids.copy_(token.reshape(1, 1))
        if self.use_graph:
            return self.graph.replay()[:, -1, :].clone()
        return self.step()[:, -1, :]

    @torch.inference_mode()
    def warm_up(self, prompt_len: int = 16, steps: int = 4) -> float:
        t0 = time.perf_counter()
        if self.use_graph and self.graph is None:
            self.capture()
        ids = torch.zeros(1, prompt_len, dtype=torch.long, device=self.device)
        token = self.prefill(ids).argmax(-1)
        for _ in range(steps):
            token = self.next(token).argmax(-1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.reset()
        return time.perf_counter() - t0


def step_supported(model: nn.Module) -> str | None:
    """Why the step engine cannot run ``model``, or None."""
    try:
        step_layout(model)
    except (ValueError, TypeError, AttributeError) as err:
        return str(err)
    return None


def build_engine(model: nn.Module, kind: str = "auto", *, max_len: int, compile: bool = False,
                 device: torch.device | None = None, host_embed: bool = False) -> Engine:
    """The engine ``kind`` (``auto``: step on CUDA where its layout fits, else hf).
    ``host_embed``: the step engine with the embedding table in host memory (the HF engine
    cannot run it: refused)."""
    if kind not in ENGINES:
        raise ValueError(f"engine {kind!r}; choose from {', '.join(ENGINES)}")
    if host_embed:
        if kind == "hf" or (why := step_supported(model)) is not None:
            reason = "--engine hf" if kind == "hf" else why
            raise ValueError(f"host_embed needs the step engine ({reason}); drop --host_embed "
                             "or use --engine step on a model it supports")
        return StepEngine(model, max_len, compile=compile, device=device, host_embed=True)
    device = device or next(model.parameters()).device
    if kind == "auto":
        kind = "step" if device.type == "cuda" and step_supported(model) is None else "hf"
    if kind == "step":
        return StepEngine(model, max_len, compile=compile, device=device)
    return HFEngine(model, max_len, compile=compile, device=device)


def prepare_model(model: nn.Module, *, device: torch.device | str | None = None,
                  policy: KernelPolicy | None = None, available: int | None = None):
    """Per-model kernel choices for ``device``: on the CPU the dense weight cache if the policy
    and the memory allow (``kernels.dense.enable_dense_cache``; logged). Returns the
    decision."""
    from liftquant.kernels.dense import enable_dense_cache

    return enable_dense_cache(model, device=device, policy=policy, available=available)
