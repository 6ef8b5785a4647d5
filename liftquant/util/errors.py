"""Bad input at the entry scripts: one line on stderr, a non-zero exit, nothing left behind.

An expected error (a ``ValueError``, an ``OSError`` for a path, or one of the toolkit's own
error classes) is printed as one line ``error: <message>``; its message names the flag or file
to change. ``--debug`` shows the traceback instead. Exit codes:

* :data:`EXIT_USAGE` (2, as argparse uses for a malformed command line): refused before the
  model is read (a flag value, the lattice it names, the output folder);
* :data:`EXIT_REFUSED` (1): refused or failed on what the run found (model, data, disk).

:class:`OutputGuard` removes what a run wrote under ``--save_dir`` when it stops before its
first finished block, so a refused run leaves no folder or file behind.

Only the entry scripts (main.py, e2efinetune.py, lattice_generator.py) call this module; it is
the one place in the package that writes to stderr directly (everything else logs).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from liftquant.util.log import get_logger

EXIT_USAGE = 2
EXIT_REFUSED = 1


def expected_errors() -> tuple[type[BaseException], ...]:
    """Error classes that mean bad input (reported in one line), not a bug (traceback)."""
    from liftquant.demo.assets import AssetError
    from liftquant.evaluation.data import DatasetUnavailableError

    return (ValueError, OSError, AssetError, DatasetUnavailableError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (an ``OSError`` without its ``[Errno N]`` prefix)."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror if exc.filename is None else f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def report(exc: BaseException, code: int) -> int:
    """Print ``error: <message>`` to stderr; return the exit code."""
    print(f"error: {one_line(exc)}", file=sys.stderr)
    return code


def one_line_usage_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make argparse's own errors (unknown flag, bad number) one line instead of the usage."""
    def error(message: str):
        print(f"error: {message} (see {parser.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)

    parser.error = error  # type: ignore[method-assign]
    return parser


class OutputGuard:
    """Checks that ``save_dir`` can be written, and undoes a run that stops before its first
    finished block: folders it created are removed, and so are entries it added to a folder
    that already existed. A run with a finished block keeps everything (``--resume``)."""

    def __init__(self, save_dir: str | os.PathLike, *, flag: str = "--save_dir") -> None:
        self.save_dir = Path(save_dir).expanduser().absolute()
        self.flag = flag
        self.started = time.time()
        self.created_root: Path | None = None  # topmost folder the run is going to create
        parent = self.save_dir
        while not parent.exists() and parent != parent.parent:
            self.created_root, parent = parent, parent.parent
        self.existing_parent = parent
        existed = self.created_root is None and self.save_dir.is_dir()
        self.before = set(os.listdir(self.save_dir)) if existed else set()

    def check_writable(self) -> None:
        """Refuse, before anything is loaded, a ``save_dir`` that cannot be created or written
        (tries a temporary file: permission bits alone mislead, e.g. when running as root)."""
        if self.created_root is None and not self.save_dir.is_dir():
            raise FileExistsError(f"{self.flag} {self.save_dir} is a file, not a folder; "
                                  f"choose another {self.flag}")
        try:
            fd, probe = tempfile.mkstemp(dir=self.existing_parent, prefix=".liftquant_probe_")
        except OSError as err:
            raise PermissionError(
                f"{self.flag} {self.save_dir}: cannot write in {self.existing_parent} "
                f"({err.strerror or err}); choose a writable {self.flag}") from None
        os.close(fd)
        os.unlink(probe)

    def finished_block(self) -> bool:
        """True when this run saved a block (or the checkpoint) since it started."""
        files = [*self.save_dir.glob("*.safetensors"), *self.save_dir.glob("blocks/*.safetensors")]
        return any(f.stat().st_mtime >= self.started - 1 for f in files if f.is_file())

    def cleanup(self) -> None:
        """Remove what this run wrote, unless it finished a block; safe to call on any error."""
        if not self.save_dir.exists() or self.finished_block():
            return
        _close_log_files_under(self.save_dir)
        if self.created_root is not None:
            shutil.rmtree(self.created_root, ignore_errors=True)
            return
        for name in set(os.listdir(self.save_dir)) - self.before:
            path = self.save_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _close_log_files_under(folder: Path) -> None:
    logger = get_logger()
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler) and \
                Path(handler.baseFilename).resolve().is_relative_to(folder.resolve()):
            logger.removeHandler(handler)
            handler.close()
