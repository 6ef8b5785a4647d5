"""The built wheel carries the package and the shipped lattices, and a non-editable install
loads a lattice from any working directory (no checkout on the path)."""

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What the build reads: the sources are copied so the build writes its build/ and *.egg-info
# into the temporary folder, never into the shared checkout (tests may run concurrently).
BUILD_INPUTS = ("pyproject.toml", "README.md", "liftquant", "lattice")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(dist), str(src)],
                   check=True, capture_output=True, text=True, timeout=300)
    (whl,) = dist.glob("liftquant-*.whl")
    return whl


def test_wheel_holds_every_module_and_lattice(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "liftquant").rglob("*.py")
               if "__pycache__" not in p.parts}
    missing = sorted(modules - names)
    assert not missing, (f"modules missing from the wheel: {missing}; add their package to "
                         "[tool.setuptools] packages in pyproject.toml")
    shipped = {f"liftquant/lattice_data/{p.name}" for p in (ROOT / "lattice").glob("*to*.pt")}
    shipped |= {"liftquant/lattice_data/index.json", "liftquant/lattice_data/README.md"}
    assert shipped <= names, sorted(shipped - names)
    assert not any(n.startswith("lattice/") for n in names), "no top-level 'lattice' package"


def test_installed_wheel_loads_shipped_lattice(wheel, tmp_path):
    """Install into a fresh venv (no editable finder, no checkout on sys.path) and load a
    lattice from another cwd. torch comes from the system site (``--system-site-packages``)
    or, where the running interpreter is itself a venv, from its site-packages through a
    plain path entry (a ``.pth`` line: it adds the folder, but runs no ``.pth`` in it, so the
    checkout's editable install stays out)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(subprocess.run([str(py), "-c", where], check=True, capture_output=True,
                                  text=True).stdout.strip())
    (purelib / "zz_parent_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True, text=True,
                   timeout=300)
    probe = (
        "import json, liftquant, liftquant.core.lattice as L\n"
        "M = L.load_projection('20to8')\n"
        "print(json.dumps({'pkg': liftquant.__file__, 'dir': str(L.LATTICE_DIR),"
        " 'shape': list(M.shape), 'shipped': L.shipped_lattices(),"
        " 'bases': L.search_bases(20, 8)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    out = subprocess.run([str(py), "-c", probe], cwd=cwd, check=True, capture_output=True,
                         text=True, timeout=300, env=env)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(got["pkg"]).is_relative_to(venv), got["pkg"]
    assert Path(got["dir"]).is_relative_to(venv) and Path(got["dir"]).name == "lattice_data"
    assert got["shape"] == [8, 20]
    index = json.loads((ROOT / "lattice" / "index.json").read_text())
    assert sorted(got["shipped"]) == sorted(r["name"] for r in index)
    assert got["bases"] == next(r["bases"] for r in index if r["name"] == "20to8")
