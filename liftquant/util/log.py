"""Logging, seeding, timing and memory helpers shared by the package and the entry scripts.

The package only ever logs through ``logging.getLogger("liftquant")``; entry scripts call
:func:`setup_logging` to attach a console (and optionally a file) handler.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `import liftquant.util.log` stays cheap
    import torch

LOGGER_NAME = "liftquant"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str | None = None) -> logging.Logger:
    """Return the package logger or one of its children (``liftquant.<name>``)."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


def setup_logging(*, level: int = logging.INFO, log_file: str | Path | None = None) -> None:
    """Attach a console handler (once) and optionally a file handler to the package logger."""
    logger = get_logger()
    logger.setLevel(level)
    if not any(getattr(h, "_liftquant_console", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._liftquant_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(fh)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (if present) and torch (CPU and CUDA)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover - numpy is a core dependency
        pass
    import torch

    torch.manual_seed(seed)


def peak_memory_gib(device: torch.device | str | None = None) -> float:
    """Peak allocated memory in GiB: CUDA allocator peak, or the process' max RSS on CPU."""
    import torch

    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(dev) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    except ImportError:  # pragma: no cover - non-POSIX
        return float("nan")


@contextlib.contextmanager
def timer() -> Iterator[dict]:
    """``with timer() as t: ...`` then ``t["seconds"]`` holds the elapsed wall time."""
    out: dict = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start
