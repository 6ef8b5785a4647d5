"""Lattice names and files, without torch: :class:`LatticeSpec` (``"24to10"`` -> D = 24 sign bits
per d = 10 weights, 2.4 bits per weight), where the shipped lattices live, and whether a lattice
file exists. Everything here is cheap, so entry scripts check ``--lattice`` before they import
torch or load a model; :mod:`liftquant.core.lattice` re-exports these names next to the search math.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

# Heuristic search enumerates 2^(D-d) paddings: beyond 2^20 it is impractical even on a GPU
# (SPEC §2: "practical range D - d <= 20").
MAX_NULL_DIM = 20
# Exhaustive search enumerates 2^D codes; 2^24 = 16.7M codes is still one fast GPU pass.
MAX_EXHAUSTIVE_DIM = 24
# "auto" uses exhaustive search up to this D (cheaper than or equal to pinv there and exact).
AUTO_EXHAUSTIVE_DIM = 16
# The quantizer's pinv search takes the union of the candidate sets of this many null-space
# bases (null_bases); bases after the first are rotations seeded from BASIS_SEED.
SEARCH_BASES = 4
BASIS_SEED = 20260
# On CPU 2^16 codes per sub-vector is too slow for whole models: exhaustive only up to here.
CPU_EXHAUSTIVE_DIM = 12


def _shipped_lattice_dir() -> Path:
    """The folder of the shipped lattices: the data package ``liftquant.lattice_data`` that a
    wheel installs (pyproject.toml maps the repository's ``lattice/`` onto it), else the
    checkout's ``lattice/`` beside the package (a source tree, or an editable install made
    before that mapping existed)."""
    try:
        spec = importlib.util.find_spec("liftquant.lattice_data")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(loc) / "index.json").is_file():
            return Path(loc).resolve()
    return Path(__file__).resolve().parents[2] / "lattice"


# Where shipped lattices live; every ``root=None`` below means this folder.
LATTICE_DIR = _shipped_lattice_dir()

_SPEC_RE = re.compile(r"^\s*(?:lq-?)?(\d+)\s*(?:to|/)\s*(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class LatticeSpec:
    """A lattice ``{D}to{d}``: ``D`` sign bits decode ``d`` weights, ``D/d`` bits per weight."""

    lifted_dim: int
    target_dim: int

    def __post_init__(self) -> None:
        D, d = self.lifted_dim, self.target_dim
        if not (isinstance(D, int) and isinstance(d, int)):
            raise ValueError(f"lattice dims must be integers, got D={D!r}, d={d!r}")
        if d < 1 or D <= d:
            raise ValueError(
                f"impossible lattice {D}to{d}: need lifted_dim D > target_dim d >= 1 "
                "(D/d is the bit rate; e.g. 24to10 = 2.4 bits)"
            )
        if D - d > MAX_NULL_DIM and D > MAX_EXHAUSTIVE_DIM:
            raise ValueError(
                f"lattice {D}to{d} is not searchable: the heuristic enumerates 2^(D-d) = "
                f"2^{D - d} candidates (max 2^{MAX_NULL_DIM}) and exhaustive search 2^{D} codes "
                f"(max 2^{MAX_EXHAUSTIVE_DIM}); pick D - d <= {MAX_NULL_DIM}"
            )

    @classmethod
    def parse(cls, text: str | LatticeSpec) -> LatticeSpec:
        """Parse ``"24to10"``, ``"24/10"`` or ``"LQ-24/10"``."""
        if isinstance(text, LatticeSpec):
            return text
        m = _SPEC_RE.match(str(text))
        if not m:
            raise ValueError(f"cannot parse lattice {text!r}: expected '<D>to<d>', e.g. '24to10'")
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def name(self) -> str:
        return f"{self.lifted_dim}to{self.target_dim}"

    @property
    def bits_per_weight(self) -> float:
        return self.lifted_dim / self.target_dim

    @property
    def null_dim(self) -> int:
        return self.lifted_dim - self.target_dim

    def default_method(self, device_type: str = "cuda") -> str:
        """Exhaustive search where it is cheap and exact (small D; on CPU only tiny D)."""
        limit = AUTO_EXHAUSTIVE_DIM if device_type == "cuda" else CPU_EXHAUSTIVE_DIM
        return "exhaustive" if self.lifted_dim <= limit else "pinv"

    def __str__(self) -> str:
        return self.name


@functools.lru_cache(maxsize=8)
def _cached_index_bases(path: Path, mtime_ns: int, size: int) -> dict[str, int]:
    rows = json.loads(path.read_text())
    return {r["name"]: int(r["bases"]) for r in rows if isinstance(r.get("bases"), int)}


def search_bases(D: int, d: int, root: str | Path | None = None) -> int:
    """Null-space bases the pinv search uses for ``DtoD``: the ``bases`` recorded for it in the
    lattice index (a lattice may need a wider search to reach its measured MSE), else
    :data:`SEARCH_BASES`."""
    path = Path(root or LATTICE_DIR) / "index.json"
    try:
        st = path.stat()
        table = _cached_index_bases(path, st.st_mtime_ns, st.st_size)
    except (OSError, ValueError, KeyError, TypeError):
        return SEARCH_BASES
    return table.get(f"{D}to{d}", SEARCH_BASES)


def lattice_path(spec: LatticeSpec | str, root: str | Path | None = None) -> Path:
    spec = LatticeSpec.parse(spec)
    return Path(root or LATTICE_DIR) / f"{spec.name}.pt"


def check_lattice_file(spec: LatticeSpec | str, root: str | Path | None = None) -> Path:
    """The file of ``spec`` under ``root`` (default: shipped); a missing one is refused with the
    command that generates it."""
    spec = LatticeSpec.parse(spec)
    path = lattice_path(spec, root)
    if not path.is_file():
        raise FileNotFoundError(
            f"no lattice file {path}; shipped: {', '.join(shipped_lattices(root)) or 'none'}. "
            f"Generate it with: python lattice_generator.py --expc {spec.name}"
        )
    return path


def shipped_lattices(root: str | Path | None = None) -> list[str]:
    """Names of the lattices available under ``root`` sorted by bits per weight."""
    folder = Path(root or LATTICE_DIR)
    names = []
    for p in folder.glob("*to*.pt"):
        try:
            names.append(LatticeSpec.parse(p.stem))
        except ValueError:
            continue
    return [s.name for s in sorted(names, key=lambda s: (s.bits_per_weight, s.lifted_dim))]
