"""The kernel policy and the planner: which path a packed layer takes, decided in one place.

:class:`KernelPolicy` is a frozen dataclass built once (:meth:`KernelPolicy.from_env`, the only
code in the package that reads the ``LIFTQUANT_*`` kernel variables and ``TRITON_INTERPRET``).
A backend instance owns one policy together with its GEMV tuner and split-K workspaces
(``registry``); benchmarks A/B two policies by building two backends, not by patching modules.

:func:`plan` maps (layer shape, tokens, dtype, policy, device) to a :class:`Plan`: the path and
its launch flags (programmatic dependent launch, where T* lets its GEMV start, whether the decode
step may compute the layer input inside T*). The backend passes these decisions down to the
custom ops as arguments; no op re-derives them.

Paths (``PATHS``):

* ``torch``: the reference (``torch_ref.linear``): any device and dtype, autograd;
* ``dense``: ``F.linear`` with a dense cache of the decoded weight (CPU; ``kernels.dense``);
* ``fused_small``: T* inside the GEMV program, one launch (``fused_small``), batch 1;
* ``gemv``: fused T* (pair layout) then the int1 GEMV (split-K / row tile, tuned), batch 1;
* ``gemv_lut``: fused T* (plain layout) then the lookup-table GEMV (``gemv_lut``), batch 1,
  when ``gemv_kind == "lut"``;
* ``gemm_small``: fused T* (plain layout) then the split-K tensor-core GEMM for a few tokens
  (``gemm_small``), batch 2-16;
* ``gemm_fused_t``: fused T* (plain layout) then the int1 GEMM, a few tokens;
* ``gemm``: T* as batched torch matmuls then the int1 GEMM (prefill).

Environment (each value refused with a one-line ``ValueError`` naming the allowed ones):

==========================  =========================================================  =======
``LIFTQUANT_PDL``           programmatic dependent launch on Hopper+ (0/1)              1
``LIFTQUANT_FUSED_SMALL``   one-launch small path: auto (where it fits and PDL is off)  auto
                            / 0 / 1
``LIFTQUANT_GEMV``          decode GEMV: auto / splitk / rowtile (tuner) / lut          auto
``LIFTQUANT_TUNE``          time the GEMV candidates per shape (0: heuristic)           1
``LIFTQUANT_FUSE_PROLOGUES`` decode step computes add+RMSNorm / SiLU inside T* (0/1)    1
``LIFTQUANT_DENSE_CACHE``   CPU dense weight cache: auto (if it fits) / 0 / 1           auto
``LIFTQUANT_GEMM_SMALL``    split-K tensor-core GEMM for 2-16 tokens (0/1)              1
==========================  =========================================================  =======
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

PATHS = ("torch", "dense", "fused_small", "gemv", "gemv_lut", "gemm_small", "gemm_fused_t",
         "gemm")
# Tokens up to which the decode GEMV runs (one pass over the weights per token); larger
# batches use the tensor-core GEMM.
GEMV_MAX_TOKENS = 1
# Tokens up to which T* runs as one fused Triton launch; beyond, batched torch matmuls are
# already well shaped.
TRANSFORM_MAX_TOKENS = 16
# Tokens up to which the split-K tensor-core GEMM (``gemm_small``) runs: one MMA tile.
GEMM_SMALL_MAX_TOKENS = 16
# GEMVs with more packed weight bytes, and the transforms that feed them, launch without PDL.
# On the H100 PDL cost the 8B shape (GEMVs of 5-37 MB) a little decode speed, while the 0.1-0.5B
# shapes (GEMVs of at most 2.7 MB) decoded faster with it (measured in bench/kernels/README.md).
PDL_MAX_GEMV_BYTES = 4 << 20
# The dense CPU cache is used when its bytes fit in this fraction of the available memory.
DENSE_CACHE_FRACTION = 0.5
# Largest padded tiles of the one-launch small path (fused_small.py has the measurements).
FUSED_SMALL_MAX_H_TILE = 32 * 64
FUSED_SMALL_MAX_X_TILE = 32 * 32
HALF = (torch.float16, torch.bfloat16)

# environment variable -> (policy field, allowed values); ("0", "1") fields are booleans
_BOOL = ("0", "1")
ENV_FIELDS = {
    "LIFTQUANT_PDL": ("pdl", _BOOL),
    "LIFTQUANT_FUSED_SMALL": ("fused_small", ("auto", "0", "1")),
    "LIFTQUANT_GEMV": ("gemv_kind", ("auto", "splitk", "rowtile", "lut")),
    "LIFTQUANT_TUNE": ("tune", _BOOL),
    "LIFTQUANT_FUSE_PROLOGUES": ("fuse_prologues", _BOOL),
    "LIFTQUANT_DENSE_CACHE": ("dense_cache", ("auto", "0", "1")),
    "LIFTQUANT_GEMM_SMALL": ("gemm_small", _BOOL),
}
INTERPRET_ENV = "TRITON_INTERPRET"


def env_choice(environ: Mapping[str, str], name: str, default: str,
               choices: tuple[str, ...]) -> str:
    """``environ[name]`` stripped and lower case (``default`` when unset); anything outside
    ``choices`` raises a one-line ``ValueError`` naming them."""
    value = environ.get(name, default).strip().lower()
    if value not in choices:
        listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
        raise ValueError(f"{name}={value!r}; use {listed}")
    return value


@dataclass(frozen=True)
class KernelPolicy:
    """Every switch of the packed-layer kernels; see the module docstring."""

    pdl: bool = True
    pdl_early: bool = True  # T* lets its GEMV launch at its start (else once its loads issue)
    pdl_max_gemv_bytes: int = PDL_MAX_GEMV_BYTES
    fused_small: str = "auto"  # auto / 0 / 1
    gemv_kind: str = "auto"  # auto / splitk / rowtile (the tuner's kernels) / lut
    tune: bool = True
    fuse_prologues: bool = True
    gemv_max_tokens: int = GEMV_MAX_TOKENS
    transform_max_tokens: int = TRANSFORM_MAX_TOKENS
    dense_cache: str = "auto"  # auto / 0 / 1
    dense_cache_fraction: float = DENSE_CACHE_FRACTION
    gemm_small: bool = True  # batches of 2-16 tokens take the split-K tensor-core GEMM
    interpret: bool = False  # TRITON_INTERPRET=1: Triton kernels run on CPU tensors

    def __post_init__(self) -> None:
        for field_name, choices in ENV_FIELDS.values():
            value = getattr(self, field_name)
            if choices is not _BOOL and value not in choices:
                raise ValueError(f"KernelPolicy.{field_name}={value!r}; use {', '.join(choices)}")
        if self.gemv_max_tokens < 0 or self.transform_max_tokens < self.gemv_max_tokens:
            raise ValueError("KernelPolicy: need 0 <= gemv_max_tokens <= transform_max_tokens")
        if not 0 < self.dense_cache_fraction <= 1:
            raise ValueError(f"KernelPolicy.dense_cache_fraction={self.dense_cache_fraction}; "
                             "use a fraction in (0, 1]")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> KernelPolicy:
        """The policy the environment asks for (``os.environ`` by default), then ``overrides``."""
        environ = os.environ if environ is None else environ
        values: dict = {}
        for name, (field_name, choices) in ENV_FIELDS.items():
            default = getattr(cls, field_name)
            default = ("1" if default else "0") if isinstance(default, bool) else default
            value = env_choice(environ, name, default, choices)
            values[field_name] = value == "1" if choices is _BOOL else value
        values["interpret"] = environ.get(INTERPRET_ENV) == "1"
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes) -> KernelPolicy:
        return dataclasses.replace(self, **changes)


_DEFAULT: list[KernelPolicy] = []


def default_policy() -> KernelPolicy:
    """The process's policy from the environment, built on first use and kept."""
    if not _DEFAULT:
        _DEFAULT.append(KernelPolicy.from_env())
    return _DEFAULT[0]


def reset_default_policy() -> None:
    """Forget the process policy (tests that change the environment)."""
    _DEFAULT.clear()


def interpreting() -> bool:
    """Whether the Triton kernels run under the interpreter (the process policy's reading of
    ``TRITON_INTERPRET``; Triton itself reads it when the kernels are defined)."""
    return default_policy().interpret


@dataclass(frozen=True)
class Target:
    """What the planner needs to know about the device: its type, CUDA compute capability
    (major; 0 elsewhere) and whether Triton kernels can run there."""

    type: str
    capability: int = 0
    triton: bool = False


@dataclass(frozen=True)
class LayerShape:
    """A packed layer (or a sibling group's first member) as the planner sees it."""

    in_features: int
    out_features: int
    block_shape: tuple[int, int]
    lifted_cols: int  # C: columns of R (lifted values per row of the (n1, n2) view)
    packed_bytes: int  # packed code bytes (all members of a group)

    @classmethod
    def of(cls, layer, packed_bytes: int | None = None) -> LayerShape:
        return cls(layer.in_features, layer.out_features, tuple(layer.block_shape),
                   int(layer.R.shape[-1]),
                   int(layer.packed_signs.numel() if packed_bytes is None else packed_bytes))


@dataclass(frozen=True)
class Plan:
    """The planner's decision for one call: the path and its launch flags."""

    path: str
    pdl: bool = False
    pdl_early: bool = True
    prologue: bool = False  # the decode step may compute the input inside this layer's T*

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"unknown kernel path {self.path!r}; choose from {', '.join(PATHS)}")


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(int(n), 1) - 1).bit_length())


def fits_fused_small(n1: int, n2: int, C: int) -> bool:
    """Whether a layer of block shape (n1, n2) and ``C`` lifted columns per row of H is small
    enough for the one-launch path (its program recomputes the whole T*)."""
    return (_pow2(n1) * _pow2(C) <= FUSED_SMALL_MAX_H_TILE
            and _pow2(n1) * _pow2(n2) <= FUSED_SMALL_MAX_X_TILE)


def pdl_possible(target: Target, policy: KernelPolicy) -> bool:
    """PDL on: enabled, a CUDA device of compute capability 9.0+, not the interpreter."""
    return policy.pdl and target.type == "cuda" and target.capability >= 9 and not policy.interpret


def plan(shape: LayerShape, batch: int, dtype: torch.dtype, policy: KernelPolicy, *,
         target: Target, backend: str = "triton", grad: bool = False,
         dense: bool = False) -> Plan:
    """The path of one packed-layer call with ``batch`` tokens of ``dtype`` on ``target``.

    ``backend``: the layer's backend name (only ``triton`` has kernel paths); ``grad``: autograd
    is recording (the kernels have no backward); ``dense``: the layer holds a dense weight
    cache on this device.
    """
    if dense and not grad:
        return Plan("dense")
    if backend != "triton" or not target.triton or dtype not in HALF or grad:
        return Plan("torch")
    pdl = pdl_possible(target, policy)
    if batch <= policy.gemv_max_tokens:
        small_ok = policy.fused_small == "1" or (policy.fused_small == "auto" and not pdl)
        if small_ok and fits_fused_small(*shape.block_shape, shape.lifted_cols):
            return Plan("fused_small", pdl=pdl)
        if policy.gemv_kind == "lut":
            return Plan("gemv_lut")
        gemv_pdl = pdl and shape.packed_bytes <= policy.pdl_max_gemv_bytes
        return Plan("gemv", pdl=gemv_pdl, pdl_early=policy.pdl_early,
                    prologue=policy.fuse_prologues)
    if batch <= policy.transform_max_tokens:
        if policy.gemm_small and batch <= GEMM_SMALL_MAX_TOKENS:
            return Plan("gemm_small")
        return Plan("gemm_fused_t")
    return Plan("gemm")
