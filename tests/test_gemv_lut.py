"""The lookup-table int1 GEMV (``kernels.gemv_lut``) against the float64 dense layer under
``TRITON_INTERPRET=1`` (slice sizes that do and do not divide the packed width, rows that do
not fill a step, bias, batch 2, through the backend with ``gemv_kind="lut"``), and its PTX for
sm_90 (the table gather goes through shared memory)."""

from __future__ import annotations

import textwrap

import pytest
from helpers import run_sm90_build

from liftquant.kernels.int1_words import HAS_TRITON
from tests.test_gemv_splitk import _run_interpreted

LUT_CHECK = textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    from liftquant.kernels import registry, torch_ref
    from liftquant.kernels.gemv_lut import LutConfig, launch_gemv_lut
    from liftquant.kernels.policy import default_policy
    from tests.test_kernels import rand_layer, rel_err

    for n, N, spec, bias, B in [(64, 16, "16to8", True, 1), (100, 24, "24to10", False, 2),
                                (37, 9, "12to5", True, 1), (300, 40, "20to8", False, 1)]:
        layer = rand_layer(n, N, spec, bias=bias, seed=n)
        x = torch.randn(B, n)
        xs = layer.fused_input(x).half()
        dense = torch_ref.dense_linear(layer, x)
        for cfg in [LutConfig(16, 4, 8, 1), LutConfig(32, 8, 24, 4)]:
            out = launch_gemv_lut(xs, layer.packed_signs, layer.scale, layer.bias,
                                  torch.bfloat16, cfg=cfg)
            assert out.dtype == torch.bfloat16 and rel_err(out, dense) < 1e-2, (spec, cfg)
            out = launch_gemv_lut(xs, layer.packed_signs, layer.scale, layer.bias,
                                  torch.float32, cfg=cfg)
            assert rel_err(out, dense) < 2e-3, (spec, cfg, rel_err(out, dense))  # fp32 sums
        policy = default_policy().replace(gemv_kind="lut", fused_small="0")
        registry.set_backend(layer, "triton", policy=policy)
        assert registry.get_backend("triton", "cpu", policy=policy).plan_for(
            layer, x[:1].half()).path == "gemv_lut"
        assert rel_err(layer(x[:1].half()), dense[:1]) < 3e-3
    try:
        launch_gemv_lut(xs, layer.packed_signs, layer.scale, None, torch.float16,
                        cfg=LutConfig(24))
        raise AssertionError("a group size that is not a power of two was accepted")
    except ValueError as err:
        assert "power of two" in str(err)
    print("ok")
""")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_lut_gemv_matches_reference_in_interpreter():
    _run_interpreted(LUT_CHECK)


SM90_BUILD = """
    from liftquant.kernels import gemv_lut as gl
    XS, P = torch.zeros(4096, dtype=torch.bfloat16), torch.zeros(64, dtype=torch.uint8)
    for G, BN, warps in [(32, 16, 4), (64, 16, 8)]:
        k = gl._lut_kernel.warmup(XS, P, torch.zeros(16), 4096, 14336, 1792, 16, G=G, BN=BN,
                                  RPP=256, num_warps=warps, grid=(1,))
        assert "ld.shared" in k.asm["ptx"]
    print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_lut_gemv_builds_for_sm90():
    run_sm90_build(SM90_BUILD)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,N,spec", [(4096, 1024, "24to10"), (4096, 700, "16to8"),
                                      (517, 130, "20to8")])
def test_lut_gemv_matches_reference_cuda(n, N, spec):
    import torch

    from liftquant.kernels import registry, torch_ref
    from liftquant.kernels.gemv_lut import LutConfig, launch_gemv_lut
    from liftquant.kernels.policy import default_policy
    from tests.test_kernels import rand_layer, rel_err

    layer = rand_layer(n, N, spec, bias=True, seed=N, device="cuda")
    x = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
    dense = torch_ref.dense_linear(layer, x.float())
    xs = layer.fused_input(x)
    for cfg in [LutConfig(), LutConfig(16, 8, 128, 4), LutConfig(64, 16, 512, 8)]:
        out = launch_gemv_lut(xs, layer.packed_signs, layer.scale, layer.bias, torch.bfloat16,
                              cfg=cfg)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and rel_err(out, dense) < 2e-2, (cfg, rel_err(out, dense))
    registry.set_backend(layer, "triton", policy=default_policy().replace(gemv_kind="lut"))
    assert rel_err(layer(x), dense) < 2e-2
