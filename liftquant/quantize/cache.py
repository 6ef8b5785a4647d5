"""ActivationCache: N x L x H activation buffers in host RAM, pinned RAM or a disk memmap.

The block loop needs the inputs of the current block and the full-precision targets for all N
calibration samples. At the paper's 4096 x 2048 tokens and hidden size 5120 one bf16 buffer is
~86 GB, so the official release's two in-RAM buffers (~172 GB) do not fit ordinary hosts. This
cache holds one buffer in exactly one place:

- ``"cpu"``: a plain tensor;
- ``"pinned"``: page-locked RAM for asynchronous host-to-device copies (falls back to ``"cpu"``
  when pinning is impossible, e.g. no accelerator);
- ``"disk"``: a ``numpy.memmap`` in a temporary file (the page cache keeps hot parts in RAM, the
  kernel evicts the rest). NumPy has no bfloat16, so bf16 is stored bit-exactly as int16.

Reads return copies; writes convert to the cache dtype. Pair two caches (inputs, targets) by
drawing indices once with :func:`batch_indices` and calling :meth:`ActivationCache.get_batch`
on both.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from typing_extensions import Self

from liftquant.util.log import get_logger

logger = get_logger("cache")

MODES = ("cpu", "pinned", "disk")
#: Share of the currently available host RAM that in-RAM caches may take before spilling.
DEFAULT_BUDGET_FRACTION = 0.5
#: Suffix of the temporary memmap files (easy to spot and clean up by hand after a crash).
DISK_SUFFIX = ".lqcache"
#: torch dtype -> (numpy storage dtype, torch view dtype of that storage).
_NUMPY_STORAGE = {
    torch.float32: (np.float32, torch.float32),
    torch.float16: (np.float16, torch.float16),
    torch.bfloat16: (np.int16, torch.int16),  # bit pattern; viewed back as bf16 on read
}

Index = int | slice | Sequence[int] | torch.Tensor


class ActivationCache:
    """``n`` activation samples of shape ``(seq_len, hidden)`` in RAM, pinned RAM or on disk."""

    def __init__(
        self,
        n: int,
        seq_len: int,
        hidden: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        mode: str = "cpu",
        path: str | os.PathLike | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if dtype not in _NUMPY_STORAGE:
            raise ValueError(f"dtype must be one of {tuple(_NUMPY_STORAGE)}, got {dtype}")
        if min(n, seq_len, hidden) <= 0:
            raise ValueError(f"shape must be positive, got {(n, seq_len, hidden)}")
        self.shape = (n, seq_len, hidden)
        self.dtype = dtype
        self.mode = mode
        self.file: Path | None = None
        self._tensor: torch.Tensor | None = None
        self._memmap: np.memmap | None = None
        if mode == "disk":
            self._open_memmap(path)
        else:
            self._tensor = self._alloc_ram(pin=mode == "pinned")

    def _alloc_ram(self, *, pin: bool) -> torch.Tensor:
        if pin:
            try:
                return torch.empty(self.shape, dtype=self.dtype, pin_memory=True)
            except RuntimeError as err:  # no accelerator, or pinning refused
                logger.warning("pinned cache unavailable (%s); using plain CPU memory", err)
                self.mode = "cpu"
        return torch.empty(self.shape, dtype=self.dtype)

    def _open_memmap(self, path: str | os.PathLike | None) -> None:
        directory = Path(path) if path is not None else Path(tempfile.gettempdir())
        check_free_space(directory, self.nbytes)
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="activations_", suffix=DISK_SUFFIX, dir=directory)
        os.close(fd)
        self.file = Path(name)
        np_dtype = _NUMPY_STORAGE[self.dtype][0]
        self._memmap = np.memmap(self.file, dtype=np_dtype, mode="w+", shape=self.shape)
        logger.debug("disk cache %s: %.2f GiB", self.file, self.nbytes / 2**30)

    # ------------------------------------------------------------------------ properties
    @staticmethod
    def estimate_bytes(n: int, seq_len: int, hidden: int, dtype: torch.dtype) -> int:
        """Bytes one cache of this shape takes."""
        return n * seq_len * hidden * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (in RAM or on disk)."""
        return self.estimate_bytes(*self.shape, self.dtype)

    @property
    def closed(self) -> bool:
        return self._tensor is None and self._memmap is None

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        where = f", file={str(self.file)!r}" if self.file else ""
        return f"ActivationCache(shape={self.shape}, dtype={self.dtype}, mode={self.mode!r}{where})"

    # ------------------------------------------------------------------------ read/write
    def __getitem__(self, idx: Index) -> torch.Tensor:
        """A CPU copy of the selected samples (``(L, H)`` for an int, ``(k, L, H)`` otherwise)."""
        self._check_open()
        idx = _normalize_index(idx)
        if self._memmap is not None:
            return self._from_numpy(np.array(self._memmap[idx]))
        if isinstance(idx, np.ndarray):
            return self._tensor[torch.from_numpy(idx)]  # advanced indexing already copies
        return self._tensor[idx].clone()

    def __setitem__(self, idx: Index, value: torch.Tensor) -> None:
        """Write samples (any device/dtype; converted to the cache dtype on CPU)."""
        self._check_open()
        idx = _normalize_index(idx)
        value = value.detach().to(device="cpu", dtype=self.dtype)
        if self._memmap is not None:
            storage_dtype = _NUMPY_STORAGE[self.dtype][1]
            self._memmap[idx] = value.contiguous().view(storage_dtype).numpy()
        else:
            self._tensor[torch.from_numpy(idx) if isinstance(idx, np.ndarray) else idx] = value

    def get_batch(self, indices: Index, device: torch.device | str = "cpu") -> torch.Tensor:
        """Samples ``indices`` stacked as ``(k, L, H)`` on ``device``."""
        self._check_open()
        idx = _normalize_index(indices)
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        device = torch.device(device)
        non_blocking = self.mode == "pinned" and device.type != "cpu"
        if self._tensor is not None and isinstance(idx, slice) and device.type != "cpu":
            return self._tensor[idx].to(device, non_blocking=non_blocking)  # pinned view, no copy
        return self[idx].to(device)

    def iter_batches(
        self,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield ``(k, L, H)`` batches on ``device``; the last one may be smaller."""
        for idx in batch_indices(len(self), batch_size, shuffle=shuffle, generator=generator):
            yield self.get_batch(idx, device)

    def copy_from(self, other: ActivationCache, *, chunk: int = 1) -> None:
        """Copy every sample of ``other`` (same shape) into this cache, ``chunk`` at a time."""
        if other.shape != self.shape:
            raise ValueError(f"shape mismatch: {other.shape} vs {self.shape}")
        for start in range(0, len(self), chunk):
            stop = min(start + chunk, len(self))
            self[start:stop] = other[start:stop]

    # ------------------------------------------------------------------------ lifetime
    def flush(self) -> None:
        """Push pending memmap writes to the file (no-op for RAM modes)."""
        if self._memmap is not None:
            self._memmap.flush()

    def close(self) -> None:
        """Free the buffer and delete the temporary file; safe to call twice."""
        self._tensor = None
        if self._memmap is not None:
            memmap, self._memmap = self._memmap, None
            mm = getattr(memmap, "_mmap", None)
            del memmap
            if mm is not None:
                with contextlib.suppress(BufferError, ValueError):  # a view still exports it
                    mm.close()
        if self.file is not None:
            self.file.unlink(missing_ok=True)
            self.file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing useful to report
            self.close()

    # ------------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("ActivationCache is closed")

    def _from_numpy(self, array: np.ndarray) -> torch.Tensor:
        out = torch.from_numpy(array)
        return out.view(self.dtype) if self.dtype == torch.bfloat16 else out


def _normalize_index(idx: Index) -> int | slice | np.ndarray:
    """Turn tensors and sequences into an int64 index array; keep ints and slices."""
    if isinstance(idx, bool):
        raise TypeError("boolean index is not supported")
    if isinstance(idx, int | slice):
        return idx
    if isinstance(idx, torch.Tensor):
        if idx.ndim == 0:
            return int(idx)
        return idx.detach().cpu().to(torch.int64).numpy()
    return np.asarray(idx, dtype=np.int64)


def batch_indices(
    n: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Split ``range(n)`` into index batches (shuffled with ``generator`` if asked)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return list(order.split(batch_size))


def available_host_bytes() -> int:
    """Host RAM available to new allocations (psutil if present, else /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB -> bytes
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_mode(
    n_bytes_needed: int,
    *,
    budget_fraction: float = DEFAULT_BUDGET_FRACTION,
    prefer: str = "cpu",
    cap_bytes: int | None = None,
) -> str:
    """``prefer`` ("cpu" or "pinned") when the caches fit the RAM budget, else ``"disk"``.

    ``n_bytes_needed`` is the total of every cache alive at once (e.g. inputs + targets). The
    budget is ``budget_fraction`` of the available RAM, or ``cap_bytes`` when that is smaller
    (``--max_host_memory``).
    """
    if prefer not in ("cpu", "pinned"):
        raise ValueError(f"prefer must be 'cpu' or 'pinned', got {prefer!r}")
    budget = budget_fraction * available_host_bytes()
    if cap_bytes is not None:
        budget = min(budget, cap_bytes)
    mode = prefer if n_bytes_needed <= budget else "disk"
    logger.debug(
        "caches need %.2f GiB, RAM budget %.2f GiB -> %s",
        n_bytes_needed / 2**30,
        budget / 2**30,
        mode,
    )
    return mode


def check_free_space(directory: str | os.PathLike, n_bytes: int) -> None:
    """Refuse (``OSError`` ENOSPC naming ``--cache_dir``) a disk cache that would not fit.

    A memmap file is sparse: creating it takes no space, and writing into a full filesystem
    later kills the process with SIGBUS ("Bus error", exit 135) and no message. So the space is
    checked up front: ``n_bytes`` for the new cache plus the not yet written part of the other
    ``*.lqcache`` files already in ``directory`` (the run's other caches, e.g. the inputs when
    the targets are opened). ``directory`` need not exist yet: its nearest existing parent is
    measured.
    """
    import errno
    import shutil

    directory = Path(directory)
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    pending = 0
    if directory.is_dir():
        for other in directory.glob(f"*{DISK_SUFFIX}"):
            with contextlib.suppress(OSError):  # removed meanwhile by its owner
                st = other.stat()
                pending += max(0, st.st_size - getattr(st, "st_blocks", 0) * 512)
    free = shutil.disk_usage(probe).free
    if n_bytes + pending <= free:
        return

    def size(n: int) -> str:
        return f"{n} bytes ({n / 2**30:.2f} GiB)"

    others = (f" plus {size(pending)} not yet written by the other {DISK_SUFFIX} files there"
              if pending else "")
    raise OSError(errno.ENOSPC,
                  f"the disk activation cache needs {size(n_bytes)}{others} in {directory}, but "
                  f"only {size(free)} are free; point --cache_dir at a filesystem with more "
                  "free space, or lower --nsamples / --seqlen")
