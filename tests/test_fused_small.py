"""The one-launch small-layer decode (``kernels.fused_small``): T* computed inside the GEMV.

Under ``TRITON_INTERPRET=1`` it matches the float64 dense layer for single layers (padding,
odd block shapes, bias) and for q/k/v-style groups; the Triton backend and ``PackedGroup`` take
it for small shapes and fall back to the two-kernel path when it is off or does not fit. On a
GPU the same checks run against the two-kernel path.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from liftquant.kernels import fused_small, registry, torch_ref
from liftquant.kernels.int1_words import HAS_TRITON
from tests.test_gemv_splitk import _run_interpreted
from tests.test_kernels import _fresh_registry, rand_layer, rel_err  # noqa: F401 (autouse)


def test_fits_bounds_the_shapes():
    assert fused_small.fits(24, 24, 60)  # SmolLM2 q/k/v/o/gate/up at 20to8
    assert not fused_small.fits(48, 32, 80)  # SmolLM2 down_proj: measured slower
    assert not fused_small.fits(28, 32, 80)  # Qwen2.5-0.5B attention
    assert not fused_small.fits(64, 64, 160)  # Llama-3-8B attention: two kernels
    assert not fused_small.fits(128, 112, 280)


def test_auto_leaves_the_path_to_pdl():
    """auto: the one-launch path where it fits, unless the kernels launch with PDL."""
    from liftquant.kernels.policy import KernelPolicy, LayerShape, Target, plan

    small, large = rand_layer(576, 64, "20to8"), rand_layer(4096, 64, "20to8")
    cpu, hopper = Target("cpu", 0, True), Target("cuda", 9, True)

    def path(layer, target, **policy):
        return plan(LayerShape.of(layer), 1, torch.float16, KernelPolicy(**policy),
                    target=target).path

    assert path(small, cpu) == "fused_small" and path(large, cpu) == "gemv"
    assert path(small, hopper) == "gemv"  # PDL on
    assert path(small, hopper, pdl=False) == "fused_small"
    assert path(small, hopper, fused_small="1") == "fused_small"
    assert path(large, hopper, fused_small="1") == "gemv"
    assert path(small, cpu, fused_small="0") == "gemv"


FUSED_CHECK = textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    from liftquant.engine.groups import PackedGroup
    from liftquant.kernels import fused_small as fs, registry, torch_ref
    from liftquant.kernels.policy import default_policy
    from tests.test_kernels import _fresh_registry, rand_layer, rel_err  # noqa: F401 (autouse)

    # single layers: d-multiples, padding (37, 100), 16-byte and odd packed rows, bias
    for n, N, spec, bias in [(64, 16, "16to8", True), (37, 9, "12to5", False),
                             (100, 24, "24to10", True), (96, 33, "20to8", False)]:
        layer = rand_layer(n, N, spec, bias=bias, seed=n)
        x = torch.randn(2, n).half()
        d, D = layer.spec.target_dim, layer.spec.lifted_dim
        out = fs.launch_fused_small(x, layer.s1, layer.L, layer.R, layer.s2_act,
                                    layer.packed_signs, layer.scale, layer.bias, d=d, D=D)
        err = rel_err(out, torch_ref.dense_linear(layer, x.float()))
        assert out.shape == (2, N) and err < 3e-3, (spec, err)
        registry.set_backend(layer, "triton")  # the backend takes the one-launch path
        err = rel_err(layer(x[:1]), torch_ref.dense_linear(layer, x[:1].float()))
        assert err < 3e-3, (spec, err)
    # a q/k/v-style group: members of different row counts
    layers = [rand_layer(200, N, "24to10", bias=True, seed=N) for N in (24, 8, 8)]
    x = torch.randn(1, 200).half()
    dense = [torch_ref.dense_linear(m, x.float()) for m in layers]
    group = PackedGroup(layers)
    for m in layers:
        m.backend = "triton"
    outs = group(x)
    for o, ref in zip(outs, dense):
        assert rel_err(o, ref) < 3e-3
    assert group.plan_for(x).path == "fused_small"
    for m in layers:  # the two-kernel path gives the same answers
        m.kernel_policy = default_policy().replace(fused_small="0")
    assert group.plan_for(x).path == "gemv"
    for o, ref in zip(group(x), dense):
        assert rel_err(o, ref) < 3e-3
    print("ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_fused_small_matches_reference_in_interpreter():
    _run_interpreted(FUSED_CHECK)


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,N,spec", [(576, 576, "20to8"), (576, 1536, "24to10"),
                                      (576, 192, "16to8"), (520, 64, "24to8")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_small_matches_two_kernels_cuda(n, N, spec, dtype, monkeypatch):
    layer = rand_layer(n, N, spec, bias=True, seed=1, device="cuda")
    registry.set_backend(layer, "triton")
    x = torch.randn(1, n, device="cuda", dtype=dtype)
    ref = torch_ref.linear(layer, x.float())
    assert fused_small.fits(*layer.block_shape, layer.R.shape[-1])
    from liftquant.kernels.policy import default_policy

    registry.set_backend(layer, "triton", policy=default_policy().replace(fused_small="1"))
    one = layer(x)
    registry.set_backend(layer, "triton", policy=default_policy().replace(fused_small="0"))
    two = layer(x)
    assert rel_err(one, ref) < 2e-2 and rel_err(two, ref) < 2e-2 and rel_err(one, two) < 1e-2
