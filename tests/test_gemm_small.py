"""The split-K tensor-core GEMM for 2-16 tokens (``kernels.gemm_small``).

CPU: under ``TRITON_INTERPRET=1`` (a subprocess) every operand order and sign expansion (tokens
on M in 16- and 64-row tiles), split
factors 1 / 2 / automatic, 1, 3 and 16 tokens, rows with and without bias, word counts that are
and are not multiples of the tile, rows read as words and byte by byte, against the float64
dense layer; the split arithmetic; bad
input refused. CUDA (skipped without a GPU): every candidate of the benchmark sweep on Llama-3
8B-like rows (the sweep's quick set and the planner's two configurations), fp16 and bf16, eager
and replayed in a CUDA graph, against the dense layer.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from test_gemv_splitk import _run_interpreted

from liftquant.kernels import gemm_small as gs
from liftquant.kernels.int1_words import HAS_TRITON
from tests.test_kernels import rand_layer, rel_err

CUDA = torch.cuda.is_available()

INTERPRETED = textwrap.dedent("""
    import itertools, sys
    import torch
    torch.set_num_threads(1)
    from liftquant.kernels import gemm_small as gs, torch_ref
    from tests.test_kernels import rand_layer, rel_err

    # (n, N, lattice): 16-byte rows; 28-byte rows whose K (220) is not a multiple of 32;
    # 20-byte rows; 48-byte rows (K 384 over 3 x 128 slices); 30- and 9-byte rows (bytes)
    full = sys.argv[1] == "full"
    shapes = [(64, 16, "16to8"), (81, 24, "20to8"), (61, 40, "12to5"), (160, 33, "24to10"),
              (100, 24, "24to10"), (30, 11, "24to10")]
    for n, N, spec in shapes if full else shapes[1:2] + shapes[4:5]:
        layer = rand_layer(n, N, spec, bias=N % 3 == 0, seed=n)
        for B in (1, 3, 16) if full else (3,):
            x = torch.randn(B, n)
            xs = layer.fused_input(x).half()
            dense = torch_ref.dense_linear(layer, x)
            for swap, pairs, split, bk in itertools.product((True, False), (True, False),
                                                            (1, 2, 0) if full else (0,),
                                                            (32, 64) if full and N == 16
                                                            else (32,)):
                for bm in (16, 64) if not swap else (16,):  # tokens padded to 64 rows
                    cfg = gs.GemmSmallConfig(block_n=16, block_k=bk, split=split, swap=swap,
                                             pairs=pairs, num_stages=1, block_m=bm)
                    out = gs.launch_gemm_small(xs, layer.packed_signs, layer.scale, layer.bias,
                                               cfg)
                    assert out.dtype == torch.float16 and out.shape == (B, N)
                    assert rel_err(out, dense) < 3e-3, (spec, B, cfg, rel_err(out, dense))
    print("ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.slow
def test_each_variant_matches_the_dense_layer_in_interpreter():
    """Both operand orders and both sign expansions, 3 tokens, the automatic split."""
    _run_interpreted(INTERPRETED.replace("sys.argv[1]", "'quick'"), timeout=400)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_every_variant_split_and_batch_matches_the_dense_layer_in_interpreter():
    _run_interpreted(INTERPRETED.replace("sys.argv[1]", "'full'"), timeout=400)


def test_split_covers_k_in_whole_tiles():
    for N, K, bn, bk, split, sms in [(4096, 10240, 64, 256, 0, 132), (1024, 10240, 64, 256, 0, 132),
                                     (14336, 10240, 64, 256, 0, 132), (33, 384, 16, 128, 0, 4),
                                     (40, 156, 16, 32, 2, 4), (16, 128, 16, 64, 7, 4)]:
        cfg = gs.GemmSmallConfig(block_n=bn, block_k=bk, split=split)
        S, kslice = gs.resolve_split(cfg, N, K, sms)
        assert kslice % bk == 0 and (S - 1) * kslice < K <= S * kslice  # no empty slice
        if split:
            assert S <= split
    # enough slices to fill the GPU where rows are few, one where they are many
    assert gs.resolve_split(gs.GemmSmallConfig(), 1024, 10240, 132)[0] > 4
    assert gs.resolve_split(gs.GemmSmallConfig(), 14336 * 4, 10240, 132)[0] == 1


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="block_n"):
        gs.GemmSmallConfig(block_n=48)
    with pytest.raises(ValueError, match="block_k"):
        gs.GemmSmallConfig(block_k=16)
    with pytest.raises(ValueError, match="split"):
        gs.GemmSmallConfig(split=-1)
    with pytest.raises(ValueError, match="block_m"):
        gs.GemmSmallConfig(block_m=8)
    layer = rand_layer(81, 24, "20to8")  # 28-byte rows
    xs = torch.zeros(3, layer.lifted_width, dtype=torch.float16)
    ok = (layer.packed_signs, layer.scale, None)
    with pytest.raises(ValueError, match="1..16 tokens"):
        gs.launch_gemm_small(torch.zeros(17, layer.lifted_width, dtype=torch.float16), *ok)
    with pytest.raises(ValueError, match="fp16/bf16"):
        gs.launch_gemm_small(xs.float(), *ok)
    with pytest.raises(ValueError, match="hold 224 signs"):
        gs.launch_gemm_small(torch.zeros(3, 256, dtype=torch.float16), *ok)
    odd = rand_layer(100, 24, "24to10")  # 30-byte rows: read byte by byte
    assert not gs.words_aligned(odd.packed_signs) and gs.words_aligned(layer.packed_signs)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,N,spec", [(4096, 1024, "20to8"), (4096, 1000, "24to10"),
                                      (1024, 4096, "16to8"), (1000, 300, "24to10")])
def test_every_candidate_matches_the_dense_layer_cuda(dtype, n, N, spec):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from bench_gemm_small import candidates

    from liftquant.kernels import torch_ref

    layer = rand_layer(n, N, spec, bias=True, seed=n + N, device="cuda")
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for B in (2, 16):
        x = torch.randn(B, n, device="cuda")
        xs = layer.fused_input(x).to(dtype)
        dense = torch_ref.dense_linear(layer, x)
        for cfg in candidates(quick=True) + [gs.WORD_ROWS, gs.BYTE_ROWS]:
            out = gs.launch_gemm_small(xs, layer.packed_signs, layer.scale, layer.bias, cfg)
            torch.cuda.synchronize()
            assert out.dtype == dtype and torch.isfinite(out).all()
            assert rel_err(out, dense) < tol, (cfg.label, B, rel_err(out, dense))
        g = torch.cuda.CUDAGraph()
        out = torch.ops.liftquant.int1_gemm_small(xs, layer.packed_signs, layer.scale, layer.bias)
        with torch.cuda.graph(g):
            out_g = torch.ops.liftquant.int1_gemm_small(xs, layer.packed_signs, layer.scale,
                                                        layer.bias)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_g, out)  # deterministic, graph-safe
