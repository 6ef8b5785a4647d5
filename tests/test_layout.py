"""The layered package keeps the flat paths of earlier releases: every old dotted name imports
as the very same module object as its new one (so ``monkeypatch.setattr("liftquant.lattice.x")``
patches the real module) and ``python -m`` on an old path still runs. Code in the repository
uses the new paths only, so the alias finder serves outside users alone."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import liftquant

ROOT = Path(__file__).resolve().parent.parent
OLD = sorted(liftquant.MOVED)
CALLS = {"import_module", "setattr", "patch", "find_spec", "__import__", "delattr", "setitem"}
DASH_M = re.compile(r"-m\s+(liftquant(?:\.\w+)+)")


def _old(dotted: str) -> bool:
    return liftquant._new_name(dotted) is not None


def _repo_files(*suffixes: str) -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=60).stdout.split()
        files = [ROOT / f for f in out]
    except (OSError, subprocess.SubprocessError):  # a source tree without git
        files = [p for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]
    return [p for p in files if p.suffix in suffixes and p.is_file()]


def test_every_old_path_is_the_new_module():
    for old in OLD:
        new = liftquant._new_name(f"liftquant.{old}")
        assert importlib.import_module(f"liftquant.{old}") is importlib.import_module(new), old
        assert not (ROOT / "liftquant" / f"{old.replace('.', '/')}.py").exists(), old
    assert liftquant.lattice is liftquant.core.lattice
    from liftquant.checkpoint import load_quantized
    from liftquant.integrations.hf import register

    assert load_quantized is liftquant.io.checkpoint.load_quantized
    assert register is liftquant.io.hf.register


def test_monkeypatch_through_an_old_path_hits_the_real_module(monkeypatch):
    from liftquant.core import lattice

    sentinel = object()
    monkeypatch.setattr("liftquant.lattice.LATTICE_DIR", sentinel)
    assert lattice.LATTICE_DIR is sentinel


def test_repository_uses_only_new_paths():
    problems = []
    for path in _repo_files(".py"):
        rel = path.relative_to(ROOT)
        if rel == Path(__file__).relative_to(ROOT):
            continue  # this file imports old paths on purpose
        for node in ast.walk(ast.parse(path.read_text(), str(rel))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
                if node.module == "liftquant":
                    names += [f"liftquant.{a.name}" for a in node.names]
            elif isinstance(node, ast.Call) and node.args:
                func = node.func
                fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                arg = node.args[0]
                if fname in CALLS and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names = [arg.value]
            problems += [f"{rel}:{node.lineno}: {n}" for n in names if _old(n)]
    for path in _repo_files(".py", ".md", ".sh", ""):
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            problems += [f"{path.relative_to(ROOT)}:{i}: -m {m}" for m in DASH_M.findall(line)
                         if _old(m)]
    assert not problems, "old module paths (use the layered ones):\n" + "\n".join(problems)


def _run_m(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


def test_python_dash_m_runs_on_the_new_and_the_old_path():
    new = _run_m("liftquant.util.provenance", "show")
    assert new.returncode == 0, new.stderr
    assert '"source_sha256"' in new.stdout
    old = _run_m("liftquant.provenance", "--help")
    assert old.returncode == 0, old.stderr
    assert "python -m liftquant.util.provenance" in old.stdout
