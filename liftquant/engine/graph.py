"""One decode step captured as a CUDA graph and replayed per token."""

from __future__ import annotations

import time

import torch

from liftquant.engine.step import DecodeStep


class GraphedDecode:
    """A :class:`DecodeStep` captured as one CUDA graph (after eager warm-up steps, which also
    build and tune the kernels and allocate their workspaces), replayed per token."""

    def __init__(self, step: DecodeStep, *, warmup: int = 8) -> None:
        self.step = step
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        step.feed()  # host_embed: the capture reads the staged rows of the current tokens
        with torch.cuda.graph(self.graph):
            self.logits = step()  # static output: each replay rewrites it

    def replay(self) -> torch.Tensor:
        """One step: (``host_embed``: the current tokens' rows fed first), then the graph."""
        self.step.feed()
        self.graph.replay()
        return self.logits

    def tokens_per_s(self, n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            self.replay()
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)
