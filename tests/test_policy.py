"""The kernel policy (``kernels.policy``): environment parsing, the planner's decisions, and
every path the planner can choose on the CPU against the torch reference.

The Triton paths (``fused_small``, ``gemv``, ``gemm_fused_t``, ``gemm``) run on CPU tensors
only under ``TRITON_INTERPRET=1``; :data:`PATHS_CHECK` forces each through the backend in a
subprocess (Triton picks interpreter mode when a kernel is defined).
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from liftquant.kernels import registry, torch_ref
from liftquant.kernels.int1_words import HAS_TRITON
from liftquant.kernels.policy import (
    ENV_FIELDS,
    PATHS,
    KernelPolicy,
    LayerShape,
    Plan,
    Target,
    plan,
)
from tests.test_gemv_splitk import _run_interpreted
from tests.test_kernels import _fresh_registry, rand_layer, rel_err  # noqa: F401 (autouse)

CPU = Target("cpu", 0, False)
CPU_INTERP = Target("cpu", 0, True)
H200 = Target("cuda", 9, True)
A100 = Target("cuda", 8, True)
# (out, in) of SmolLM2-135M's q_proj (one-launch size) and Llama-3-8B's down_proj at 20to8
SMALL = LayerShape(576, 576, (24, 24), 60, 576 * 180)
BIG = LayerShape(14336, 4096, (64, 64), 160, 4096 * 1792 * 4)


def test_defaults_and_every_variable():
    assert KernelPolicy.from_env({}) == KernelPolicy()
    env = {"LIFTQUANT_PDL": "0", "LIFTQUANT_FUSED_SMALL": " Auto ", "LIFTQUANT_GEMV": "rowtile",
           "LIFTQUANT_TUNE": "0", "LIFTQUANT_FUSE_PROLOGUES": "0", "LIFTQUANT_DENSE_CACHE": "1",
           "LIFTQUANT_GEMM_SMALL": "0", "TRITON_INTERPRET": "1"}
    p = KernelPolicy.from_env(env)
    assert (p.pdl, p.fused_small, p.gemv_kind, p.tune, p.fuse_prologues, p.dense_cache,
            p.gemm_small, p.interpret) == (False, "auto", "rowtile", False, False, "1", False,
                                           True)
    assert KernelPolicy.from_env(env, tune=True).tune  # overrides win
    assert set(ENV_FIELDS) == {k for k in env if k.startswith("LIFTQUANT_")}
    with pytest.raises(AttributeError):
        p.pdl = True  # frozen
    assert hash(p) != hash(KernelPolicy())  # usable as a backend key


@pytest.mark.parametrize("name", sorted(ENV_FIELDS))
def test_bad_values_are_refused_in_one_line(name):
    with pytest.raises(ValueError) as err:
        KernelPolicy.from_env({name: "maybe"})
    msg = str(err.value)
    assert "\n" not in msg and name in msg and "'maybe'" in msg and "use " in msg


def test_bad_fields_are_refused():
    with pytest.raises(ValueError, match="gemv_kind"):
        KernelPolicy(gemv_kind="cutlass")
    with pytest.raises(ValueError, match="fraction"):
        KernelPolicy(dense_cache_fraction=0)
    with pytest.raises(ValueError, match="transform_max_tokens"):
        KernelPolicy(gemv_max_tokens=4, transform_max_tokens=2)
    with pytest.raises(ValueError, match="unknown kernel path"):
        Plan("cublas")


def test_default_policy_is_read_once(monkeypatch):
    from liftquant.kernels import policy as pol

    pol.reset_default_policy()
    monkeypatch.setenv("LIFTQUANT_TUNE", "0")
    first = pol.default_policy()
    monkeypatch.setenv("LIFTQUANT_TUNE", "1")
    assert pol.default_policy() is first and first.tune is False  # built once
    pol.reset_default_policy()
    assert pol.default_policy().tune is True
    pol.reset_default_policy()


def _path(shape, batch, *, target=H200, dtype=torch.bfloat16, **kw):
    policy = KernelPolicy(**{k: kw.pop(k) for k in list(kw) if k in KernelPolicy.__annotations__})
    return plan(shape, batch, dtype, policy, target=target, **kw)


def test_planner_decisions():
    # decode on Hopper: PDL on, so the small layer takes T* + GEMV (PDL), with prologues
    assert _path(SMALL, 1) == Plan("gemv", pdl=True, pdl_early=True, prologue=True)
    assert _path(SMALL, 1, pdl=False) == Plan("fused_small")
    assert _path(SMALL, 1, target=A100) == Plan("fused_small")  # no PDL before Hopper
    assert _path(SMALL, 1, fused_small="1") == Plan("fused_small", pdl=True)
    # large GEMVs launch without PDL (pdl_max_gemv_bytes), never on the small path
    assert _path(BIG, 1) == Plan("gemv", pdl=False, prologue=True)
    assert _path(BIG, 1, pdl_max_gemv_bytes=1 << 62).pdl
    assert _path(BIG, 1, fused_small="1").path == "gemv"
    assert not _path(BIG, 1, fuse_prologues=False).prologue
    assert not _path(BIG, 1, pdl_early=False).pdl_early
    # batches: fused T* then the split-K GEMM up to 16 tokens (else, by choice, the byte-tile
    # GEMM); beyond transform_max_tokens torch T* + GEMM
    assert _path(BIG, 2) == Plan("gemm_small")
    assert _path(BIG, 16) == Plan("gemm_small") and _path(BIG, 17) == Plan("gemm")
    assert _path(BIG, 4, gemm_small=False) == Plan("gemm_fused_t")
    assert _path(BIG, 16, transform_max_tokens=32) == Plan("gemm_small")
    assert _path(BIG, 20, transform_max_tokens=32) == Plan("gemm_fused_t")
    assert _path(BIG, 4, gemv_max_tokens=4).path == "gemv"
    # the lookup-table GEMV by choice (no PDL, no prologue: T* writes plain activations)
    assert _path(BIG, 1, gemv_kind="lut") == Plan("gemv_lut")
    assert _path(SMALL, 1, gemv_kind="lut", target=A100) == Plan("fused_small")
    assert _path(BIG, 2, gemv_kind="lut").path == "gemm_small"
    # the reference wherever the kernels cannot run
    assert _path(BIG, 1, dtype=torch.float32).path == "torch"
    assert _path(BIG, 1, grad=True).path == "torch"
    assert _path(BIG, 1, backend="torch").path == "torch"
    assert _path(BIG, 1, target=CPU).path == "torch"
    # the dense cache wins on any backend, except under autograd
    assert _path(BIG, 1, dense=True).path == "dense"
    assert _path(BIG, 1, target=CPU, dense=True, dtype=torch.float32).path == "dense"
    assert _path(BIG, 1, dense=True, grad=True).path == "torch"
    # under the interpreter the CPU behaves as a GPU without PDL
    assert _path(SMALL, 1, target=CPU_INTERP).path == "fused_small"
    assert _path(BIG, 1, target=CPU_INTERP) == Plan("gemv", prologue=True)


def test_backends_own_policy_tuner_and_plans():
    a = registry.get_backend("torch", "cpu")
    b = registry.get_backend("torch", "cpu", policy=KernelPolicy(dense_cache="0"))
    assert a is not b and b.policy.dense_cache == "0"
    assert registry.get_backend("torch", "cpu", policy=KernelPolicy(dense_cache="0")) is b
    layer = rand_layer(40, 12, "8to4")
    x = torch.randn(3, 40)
    assert a.plan_for(layer, x) == Plan("torch")
    with torch.enable_grad():
        assert a.plan_for(layer, x.requires_grad_()).path == "torch"


def test_the_kernels_package_does_not_import_the_layers():
    import subprocess
    import sys

    code = ("import sys, liftquant.kernels.registry, liftquant.kernels.dense, "
            "liftquant.kernels.triton_int1, liftquant.kernels.fused_small; "
            "print('liftquant.core.linear' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


@pytest.mark.parametrize("n,N,spec", [(64, 16, "16to8"), (37, 9, "12to5"), (100, 24, "24to10")])
def test_cpu_paths_match_the_reference(n, N, spec):
    """torch and dense, the paths the planner chooses on a CPU without the interpreter."""
    from liftquant.kernels.dense import build_dense_cache

    layer = rand_layer(n, N, spec, bias=N % 2 == 0, seed=n)
    x = torch.randn(2, 3, n)
    ref = torch_ref.dense_linear(layer, x)
    backend = registry.get_backend("torch", "cpu")
    assert backend.plan_for(layer, x).path == "torch"
    assert rel_err(layer(x), ref) < 1e-5
    build_dense_cache(layer, torch.float32)
    assert backend.plan_for(layer, x).path == "dense"
    assert rel_err(layer(x), ref) < 1e-5
    assert rel_err(layer(x.bfloat16()), ref) < 2e-2  # the cache's dtype, output in x's


PATHS_CHECK = textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    from liftquant.kernels import registry, torch_ref
    from liftquant.kernels.policy import PATHS, Plan, default_policy
    from tests.test_kernels import rand_layer, rel_err

    backend = registry.get_backend("triton", "cpu")
    assert backend.name == "triton" and backend.policy.interpret
    seen = set()
    for n, N, spec, bias in [(64, 16, "16to8", True), (100, 24, "24to10", False),
                             (37, 9, "12to5", True), (81, 24, "20to8", False)]:
        layer = rand_layer(n, N, spec, bias=bias, seed=n)
        registry.set_backend(layer, "triton")
        for batch in (1, 3, 20):
            x = torch.randn(batch, n).half()
            dense = torch_ref.dense_linear(layer, x.float())
            chosen = backend.plan_for(layer, x)
            seen.add(chosen.path)
            assert rel_err(layer(x), dense) < 3e-3, (spec, batch, chosen)
            forced = (["gemv", "gemv_lut", "fused_small"] if batch == 1
                      else ["gemm_small", "gemm_fused_t", "gemm"] if batch <= 16
                      else ["gemm_fused_t", "gemm"])
            for path in forced + ["torch"]:
                out = backend.run(Plan(path), layer, x)
                assert out.dtype == x.dtype and rel_err(out, dense) < 3e-3, (spec, path)
                seen.add(path)
    assert seen == set(PATHS) - {"dense"}, seen
    print("ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_every_triton_path_matches_the_reference_in_interpreter():
    _run_interpreted(PATHS_CHECK, timeout=300)


def test_paths_are_listed():
    assert set(PATHS) == {"torch", "dense", "fused_small", "gemv", "gemv_lut", "gemm_small",
                          "gemm_fused_t", "gemm"}


def test_backends_without_a_planner_run_whole_layers():
    """A registered backend without ``plan_for`` (like BitBLAS): groups run member by member
    and the decode step computes norms itself."""
    from liftquant.engine.groups import PackedGroup, takes_prologue

    class Plain:
        name = "plain"

        def __init__(self, policy):
            self.policy = policy

        def linear(self, layer, x):
            return torch_ref.linear(layer, x)

    registry.register_backend("plain", Plain)
    try:
        layers = [rand_layer(64, N, "16to8", bias=False, seed=N) for N in (16, 8)]
        x = torch.randn(1, 64).half()
        before = [torch_ref.linear(m, x) for m in layers]
        group = PackedGroup(layers)
        for m in layers:
            m.backend = "plain"
        assert registry.plan_of(layers[0], x) == Plan("torch") and not takes_prologue(layers[0], x)
        for a, b in zip(group(x), before):
            torch.testing.assert_close(a, b)
    finally:
        registry._BACKENDS.pop("plain")
        registry.reset()
