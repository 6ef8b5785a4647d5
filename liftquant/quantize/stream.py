"""One iterator for every pass of the block loop over the activation caches.

Targets, statistics, training steps, held-out errors and propagation all do the same thing:
take index batches of the calibration samples, read them from one or two
:class:`~liftquant.quantize.cache.ActivationCache` objects, move them to the accelerator, call the block
with the replayable keyword arguments prepared for that batch size, and sometimes write the
outputs back. :class:`BlockStream` does it once:

* keyword arguments (masks, rotary tables) are converted once per batch size and reused;
* on CUDA the next batch is gathered (RAM or disk memmap), pinned and copied asynchronously by
  a worker thread while the current one computes, and outputs are copied back asynchronously
  and written into the cache by the same worker (:meth:`BlockStream.writer`);
* on CPU everything is synchronous (no gain from threads on a few cores, simpler to debug).

Values are identical to the plain synchronous loop; only the overlap changes.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn

from liftquant.quantize.cache import ActivationCache
from liftquant.quantize.capture import prepare_block_kwargs


def forward_block(block: nn.Module, x: Tensor, kwargs: dict) -> Tensor:
    """``block(x, **kwargs)`` returning the hidden states whether the block returns a tuple."""
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out


def index_batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive batches of ``indices`` (the last one may be smaller)."""
    idx = list(indices)
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]


class BlockStream:
    """Batches of cached activations on ``device`` in ``dtype`` plus their block kwargs."""

    def __init__(self, block_kwargs: dict[str, Any], *, device: torch.device,
                 dtype: torch.dtype, overlap: bool | None = None) -> None:
        self.block_kwargs = block_kwargs
        self.device = torch.device(device)
        self.dtype = dtype
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self._kwargs: dict[tuple[int, int], tuple[dict, dict[str, Any]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1) if self.overlap else None

    # ---------------------------------------------------------------------------- kwargs
    def kwargs(self, batch: int) -> dict[str, Any]:
        """The block kwargs for a batch of ``batch`` samples (converted once, then cached)."""
        key = (id(self.block_kwargs), batch)
        source, converted = self._kwargs.get(key, (None, None))
        if source is not self.block_kwargs:
            converted = prepare_block_kwargs(self.block_kwargs, batch=batch,
                                             device=self.device, dtype=self.dtype)
            self._kwargs[key] = (self.block_kwargs, converted)
        return converted

    def use_kwargs(self, block_kwargs: dict[str, Any]) -> None:
        """Serve ``block_kwargs`` from now on (hybrid models: the next block's own kwargs);
        the converted kwargs of every source dict stay cached per batch size."""
        self.block_kwargs = block_kwargs

    # ---------------------------------------------------------------------------- reads
    def _gather(self, caches: Sequence[ActivationCache], idx: list[int]) -> list[Tensor]:
        out = []
        for c in caches:
            t = c[slice(idx[0], idx[-1] + 1)] if _is_range(idx) else c[idx]  # CPU copy
            out.append(t.pin_memory() if self.overlap else t)
        return out

    def _to_device(self, host: list[Tensor]) -> list[Tensor]:
        return [t.to(self.device, dtype=self.dtype, non_blocking=self.overlap) for t in host]

    def batches(self, batches: Sequence[list[int]],
                *caches: ActivationCache) -> Iterator[tuple[list[int], list[Tensor]]]:
        """Yield ``(indices, [tensor per cache])`` for each index batch, prefetching the next."""
        if not batches:
            return
        if self._pool is None:
            for idx in batches:
                yield idx, self._to_device(self._gather(caches, idx))
            return
        pending: Future = self._pool.submit(self._gather, caches, batches[0])
        for k, idx in enumerate(batches):
            host = pending.result()
            if k + 1 < len(batches):
                pending = self._pool.submit(self._gather, caches, batches[k + 1])
            yield idx, self._to_device(host)

    # ---------------------------------------------------------------------------- writes
    @contextlib.contextmanager
    def writer(self, cache: ActivationCache) -> Iterator[_Writer]:
        """``with stream.writer(cache) as w: w.put(idx, y)``; all writes land before exit."""
        w = _Writer(cache, self._pool)
        try:
            yield w
        finally:
            w.flush()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class _Writer:
    """Device -> cache writes: async copy to pinned memory, cache write on the worker."""

    def __init__(self, cache: ActivationCache, pool: ThreadPoolExecutor | None) -> None:
        self.cache, self.pool = cache, pool
        self.futures: list[Future] = []

    def put(self, idx: list[int], value: Tensor) -> None:
        key = slice(idx[0], idx[-1] + 1) if _is_range(idx) else idx
        if self.pool is None or value.device.type != "cuda":
            self.cache[key] = value
            return
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value.detach(), non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def write() -> None:
            done.synchronize()
            self.cache[key] = host

        self.futures.append(self.pool.submit(write))

    def flush(self) -> None:
        for f in self.futures:
            f.result()
        self.futures.clear()


def _is_range(idx: list[int]) -> bool:
    return len(idx) > 0 and idx[-1] - idx[0] == len(idx) - 1 and all(
        b - a == 1 for a, b in itertools.pairwise(idx))
