"""Where a recorded number came from: commit, dirty tree, source hash, versions, GPU, command.

Every report and benchmark row names the code that produced it (SPEC §9, "trust").

* ``commit`` / ``commit_short`` / ``dirty`` come from git when the package sits in a git
  checkout; ``dirty`` is ``git status --porcelain`` of the tracked files.
* ``source_sha256`` is computed from the files themselves (:data:`SOURCE_GLOBS`), so a copied
  tree without ``.git`` (the GPU machine receives one) still records something verifiable:
  ``python -m liftquant.util.provenance match HASH`` walks ``git log`` and names the commit whose
  tree has that hash, or says "dirty/unknown".

The hash is ``sha256`` over the lines ``"<sha256 of file>  <posix path>\\n"`` of every source
file sorted by path (``sha256sum`` format), so it can be checked by hand. There is no override
variable: a value nobody can check is not provenance.

    python -m liftquant.util.provenance show            # this tree's provenance as JSON
    python -m liftquant.util.provenance match 3f2a9c... # which recent commit has this source hash
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: Repository root: the folder holding the ``liftquant`` package.
ROOT = Path(__file__).resolve().parents[2]
#: What counts as source: (top folder or file, suffixes, recursive). Lattice matrices and their
#: index change results, so they count as source too.
SOURCE_GLOBS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("liftquant", (".py",), True),
    ("main.py", (), False),
    ("e2efinetune.py", (), False),
    ("lattice_generator.py", (), False),
    ("chat", (".py",), False),
    ("scripts", (".py", ".sh"), False),
    ("lattice", (".pt", ".json"), True),
)
#: Characters of ``source_sha256`` kept in benchmark rows (``match`` accepts prefixes).
ROW_HASH_CHARS = 16
#: Commits ``match`` searches by default.
MATCH_COMMITS = 200
_PACKAGES = ("torch", "transformers", "triton", "safetensors")


# ------------------------------------------------------------------------------- source hash
def is_source(rel: str) -> bool:
    """True when the posix path ``rel`` (relative to the repository root) is source."""
    parts = rel.split("/")
    if any(p.startswith(".") or p == "__pycache__" for p in parts):
        return False
    for top, suffixes, recursive in SOURCE_GLOBS:
        if not suffixes:
            if rel == top:
                return True
        elif (parts[0] == top and len(parts) >= 2 and (recursive or len(parts) == 2)
              and rel.endswith(suffixes)):
            return True
    return False


def digest(entries: Iterable[tuple[str, str]]) -> str:
    """sha256 of ``"<file sha256>  <path>\\n"`` lines sorted by path."""
    h = hashlib.sha256()
    for path, file_hash in sorted(entries):
        h.update(f"{file_hash}  {path}\n".encode())
    return h.hexdigest()


def source_files(root: Path | str = ROOT) -> list[str]:
    """Posix paths (relative to ``root``) of the source files present on disk, sorted."""
    root = Path(root)
    found = []
    for top, _, _ in SOURCE_GLOBS:
        base = root / top
        if base.is_file() and not base.is_symlink():
            found.append(top)
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
            for name in filenames:
                full = Path(dirpath) / name
                rel = full.relative_to(root).as_posix()
                if is_source(rel) and not full.is_symlink():
                    found.append(rel)
    return sorted(set(found))


def source_sha256(root: Path | str = ROOT) -> str:
    """The source hash of the tree at ``root`` (module docstring), read from the files."""
    root = Path(root)
    return digest((rel, hashlib.sha256((root / rel).read_bytes()).hexdigest())
                  for rel in source_files(root))


# ------------------------------------------------------------------------------- git
def _git(root: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(root: Path | str = ROOT) -> dict[str, Any]:
    """``commit``, ``commit_short`` and ``dirty`` of the checkout at ``root``.

    Outside a git checkout of ``root`` itself (a copied tree, an installed package):
    ``commit = commit_short = "unknown"`` and ``dirty = None``.
    """
    root = Path(root).resolve()
    top = _git(root, "rev-parse", "--show-toplevel")
    full = _git(root, "rev-parse", "HEAD") if top is not None else None
    if top is None or full is None or Path(top.strip()).resolve() != root:
        return {"commit": "unknown", "commit_short": "unknown", "dirty": None}
    short = _git(root, "rev-parse", "--short", "HEAD") or full[:7]
    status = _git(root, "--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    return {"commit": full.strip(), "commit_short": short.strip(),
            "dirty": None if status is None else bool(status.strip())}


def git_sha(root: Path | str = ROOT) -> str:
    """Short commit of this checkout, or ``"unknown"`` (no hand-set override)."""
    return git_state(root)["commit_short"]


# ------------------------------------------------------------------------------- provenance
def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def gpu_name(device: Any = None) -> str:
    """The CUDA device's name (``device`` or the current one), else ``"cpu"``."""
    import torch

    if device is not None and torch.device(device).type != "cuda":
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(device)


def provenance(*, root: Path | str = ROOT, device: Any = None) -> dict[str, Any]:
    """Everything a recorded number needs to be traced: see the module docstring."""
    import torch

    return {
        **git_state(root),
        "source_sha256": source_sha256(root),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        **{package: _version(package) for package in _PACKAGES},
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_name(device),
        "argv": list(sys.argv),
        "command": command_line(root),
    }


def command_line(root: Path | str = ROOT) -> str:
    """``python <script> <args>`` of this process, the script relative to ``root`` if inside."""
    argv = list(sys.argv) or [""]
    script = Path(argv[0]).resolve() if argv[0] else None
    if script is not None and script.is_relative_to(Path(root).resolve()):
        argv[0] = script.relative_to(Path(root).resolve()).as_posix()
    return shlex.join(["python", *argv])


def record_fields(prov: dict[str, Any] | None = None, *, device: Any = None) -> dict[str, Any]:
    """The provenance columns of a benchmark row: commit, dirty, source_sha256 (prefix), gpu,
    date, torch version and command. ``prov`` defaults to a fresh :func:`provenance`."""
    prov = prov or provenance(device=device)
    return {"commit": prov["commit_short"], "dirty": prov["dirty"],
            "source_sha256": prov["source_sha256"][:ROW_HASH_CHARS], "gpu": prov["gpu"],
            "date": prov["date"], "torch": prov["torch"], "command": prov["command"]}


#: Row columns that, with a row's configuration columns, identify a measurement.
RECORD_KEY = ("gpu", "commit", "source_sha256")


# ------------------------------------------------------------------------------- match
class _Blobs:
    """sha256 of git blobs through one ``git cat-file --batch`` process, cached by blob id."""

    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen(["git", "-C", str(root), "cat-file", "--batch"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.cache: dict[str, str] = {}

    def sha256(self, blob: str) -> str:
        if blob not in self.cache:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(blob.encode() + b"\n")
            self.proc.stdin.flush()
            header = self.proc.stdout.readline().split()
            if len(header) != 3:
                raise RuntimeError(f"git cat-file: unexpected answer {header!r} for {blob}")
            data = self.proc.stdout.read(int(header[2]))
            self.proc.stdout.read(1)  # the newline after the contents
            self.cache[blob] = hashlib.sha256(data).hexdigest()
        return self.cache[blob]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def commit_source_sha256(commit: str, *, root: Path | str = ROOT, blobs: _Blobs | None = None
                         ) -> str:
    """:func:`source_sha256` of ``commit``'s tree, from ``git ls-tree`` and the blobs."""
    root = Path(root)
    out = _git(root, "ls-tree", "-r", "-z", "--full-tree", commit)
    if out is None:
        raise ValueError(f"git ls-tree {commit} failed in {root}")
    own = blobs is None
    blobs = blobs or _Blobs(root)
    try:
        entries = []
        for item in filter(None, out.split("\0")):
            meta, path = item.split("\t", 1)
            mode, kind, blob = meta.split()
            if kind == "blob" and mode != "120000" and is_source(path):
                entries.append((path, blobs.sha256(blob)))
        return digest(entries)
    finally:
        if own:
            blobs.close()


def match_commit(source_hash: str, *, root: Path | str = ROOT,
                 max_commits: int = MATCH_COMMITS) -> str | None:
    """The newest of the last ``max_commits`` commits whose source hash starts with
    ``source_hash`` (at least 8 hex digits), or None."""
    want = source_hash.strip().lower()
    if len(want) < 8 or any(c not in "0123456789abcdef" for c in want):
        raise ValueError(f"{source_hash!r}: give at least 8 hex digits of a source_sha256")
    root = Path(root)
    log = _git(root, "log", f"-n{max_commits}", "--format=%H")
    if log is None:
        raise ValueError(f"{root} is not a git checkout: nothing to match against")
    blobs = _Blobs(root)
    try:
        for commit in log.split():
            if commit_source_sha256(commit, root=root, blobs=blobs).startswith(want):
                return commit
    finally:
        blobs.close()
    return None


def main(argv: list[str] | None = None) -> int:
    """``show`` prints this tree's provenance; ``match HASH`` names the commit of a hash."""
    p = argparse.ArgumentParser(prog="python -m liftquant.util.provenance", description=main.__doc__,
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("show", help="print this tree's provenance as JSON")
    m = sub.add_parser("match", help="name the commit whose source tree has this hash")
    m.add_argument("hash", help="a source_sha256 (or a prefix of at least 8 hex digits)")
    m.add_argument("--max_commits", type=int, default=MATCH_COMMITS)
    m.add_argument("--repo", default=str(ROOT), help="git checkout to search (default: this)")
    args = p.parse_args(argv)
    if args.cmd == "show":
        print(json.dumps(provenance(), indent=1))
        return 0
    try:
        commit = match_commit(args.hash, root=args.repo, max_commits=args.max_commits)
    except ValueError as exc:
        p.error(str(exc))
    if commit is None:
        here = source_sha256(args.repo).startswith(args.hash.lower())
        print("dirty/unknown: no commit among the last "
              f"{args.max_commits} has this source hash"
              + (" (it is the working tree's current one)" if here else ""))
        return 1
    print(commit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
