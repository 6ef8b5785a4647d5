"""The HF engine: the model's own forward over a transformers ``StaticCache`` (any
architecture transformers runs; linear-attention states live in the cache too).

Prefill is one forward over the prompt (packed layers take the planner's GEMM path); the decode
step is the same forward for one token, under ``torch.compile(mode="reduce-overhead")`` (CUDA
graphs) when ``compile`` is set.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from liftquant.util.log import get_logger

logger = get_logger("engine")


class HFEngine:
    """Prefill / next token / warm-up over the model's forward and a ``StaticCache``."""

    name = "hf"

    def __init__(self, model: nn.Module, max_len: int, *, compile: bool = False,
                 device: torch.device | None = None) -> None:
        from transformers import StaticCache

        self.model, self.max_len = model, max_len
        self.device = device or next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.position = 0
        self.decode = self._decode_step
        if compile:
            if self.device.type != "cuda":
                logger.warning("compiling the HF decode step on %s (meant for CUDA graphs)",
                               self.device.type)
            self.decode = torch.compile(self._decode_step, mode="reduce-overhead",
                                        fullgraph=False, dynamic=False)

    def _forward(self, ids: Tensor, cache_position: Tensor) -> Tensor:
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True,
                         cache_position=cache_position, position_ids=cache_position[None])
        return out.logits[:, -1, :]

    def _decode_step(self, ids: Tensor, cache_position: Tensor) -> Tensor:
        return self._forward(ids, cache_position)

    @torch.inference_mode()
    def reset(self) -> None:
        self.cache.reset()  # the cache tensors are inference tensors (made in prefill)
        self.position = 0

    @torch.inference_mode()
    def prefill(self, ids: Tensor) -> Tensor:
        """A fresh context from ``ids`` (1, T): logits (1, V) after its last token."""
        self.reset()
        logits = self._forward(ids, torch.arange(ids.shape[1], device=self.device))
        self.position = ids.shape[1]
        return logits

    @torch.inference_mode()
    def next(self, token: Tensor) -> Tensor:
        """Feed ``token`` at the next position: logits (1, V)."""
        pos = torch.tensor([self.position], device=self.device)
        logits = self.decode(token.reshape(1, 1), pos)
        self.position += 1
        return logits

    @torch.inference_mode()
    def warm_up(self, prompt_len: int = 16, steps: int = 4) -> float:
        """Prefill and decode once on dummy tokens, then reset; returns the seconds spent.

        One eager decode step runs first: the packed layers tune their GEMV and allocate
        split-K workspaces on their first batch-1 call. Inside torch.compile's CUDA-graph
        warm-up those allocations would land in the graph pool, which then refuses to record
        ("tensors in the cudagraph pool not tracked as outputs", seen on the H100).
        """
        t0 = time.perf_counter()
        ids = torch.zeros(1, prompt_len, dtype=torch.long, device=self.device)
        token = self.prefill(ids).argmax(-1)
        pos = torch.tensor([self.position], device=self.device)
        token = self._decode_step(token.reshape(1, 1), pos).argmax(-1)
        self.position += 1
        for _ in range(steps):  # reduce-overhead compiles, then records the graph
            token = self.next(token).argmax(-1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.reset()
        return time.perf_counter() - t0
