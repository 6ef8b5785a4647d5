"""Crash-safe file writes: everything the toolkit persists goes through :func:`atomic_write`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: "str | Path", write: Callable[[str], None], *,
                 mode: int | None = None) -> Path:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then rename it over ``path``.

    A crash or an exception inside ``write`` never leaves a half-written file under the final
    name (the temp file is removed); ``mode`` sets the permissions before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
