"""The 8-bit LM head (``kernels.int8_head``): per-channel int8 against the dense head, exact
storage in the bits report, checkpoint round trip, and the Triton GEMV under the interpreter."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from liftquant.kernels.int1_words import HAS_TRITON
from liftquant.kernels.int8_head import Int8Linear, quantize_lm_head, reference
from tests.test_gemv_splitk import _run_interpreted
from tests.test_kernels import rel_err

ROOT = Path(__file__).resolve().parents[1]


def test_int8_linear_matches_the_dense_head():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 300, bias=False)
    lin.weight.data[3, 5] = 4.0  # an outlier row keeps its own scale
    head = Int8Linear.from_linear(lin)
    W = lin.weight.detach()
    assert head.weight_int8.dtype == torch.int8 and head.weight_int8.abs().max() == 127
    err = (head.dequantize_weight() - W).abs()
    assert (err <= head.scale.float()[:, None] / 2 + 1e-6).all()  # round to nearest
    assert head.dequantize_weight()[3, 5] == pytest.approx(4.0, rel=1e-3)
    x = torch.randn(5, 64)
    assert rel_err(head(x), x @ W.T) < 1e-2
    assert head.storage_bits() == {"code_bits": 300 * 64 * 8, "side_bits": 300 * 16,
                                   "weights": 300 * 64}
    with pytest.raises(ValueError, match="bias"):
        Int8Linear.from_linear(torch.nn.Linear(4, 4))


@pytest.mark.slow
def test_checkpoint_round_trip_and_exact_bits(tmp_path, tiny_lattice_dir):
    from test_chat import build_chat_checkpoint

    from liftquant.io.checkpoint import bits_report, load_quantized

    ckpt = build_chat_checkpoint(tmp_path / "ckpt", tiny_lattice_dir)
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import quantize_lm_head as script
    finally:
        sys.path.pop(0)
    assert script.main(["--checkpoint", str(ckpt), "--save_dir", str(tmp_path / "h8")]) == 0
    model, _ = load_quantized(ckpt)
    model8, _ = load_quantized(tmp_path / "h8")
    head = model8.get_output_embeddings()
    assert isinstance(head, Int8Linear)
    assert model8.config.quantization_config["lm_head"]["bits"] == 8
    V, n = head.out_features, head.in_features
    report = bits_report(model8)
    assert report["lm_head_bits"] == V * n * 8 + V * 16 and not report["lm_head_tied"]
    ids = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, model8(ids).logits
    assert rel_err(b, a) < 2e-2
    # the int8 head on a model whose head was not quantized gives the same logits in memory
    quantize_lm_head(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, b)


GEMV_CHECK = textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    from liftquant.kernels.int8_head import Int8Linear, launch_int8_gemv, reference
    from tests.test_kernels import rel_err
    for n, N, B in [(64, 300, 1), (200, 77, 3), (37, 33, 20)]:
        lin = torch.nn.Linear(n, N, bias=False)
        head = Int8Linear.from_linear(lin)
        for dt in (torch.float16, torch.bfloat16):
            x = torch.randn(B, n).to(dt)
            ref = reference(head, x.float())
            for bn, bk in [(64, 128), (16, 32)]:
                out = launch_int8_gemv(x, head.weight_int8, head.weight_scale_bits,
                                       block_n=bn, block_k=bk)
                assert out.dtype == dt and rel_err(out, ref) < 1e-2, (n, N, dt, bn, bk)
            assert rel_err(head(x), ref) < 1e-2  # the module: the custom op up to 16 tokens
    print("ok")
""")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_int8_gemv_matches_reference_in_interpreter():
    _run_interpreted(GEMV_CHECK)


def test_reference_is_used_on_cpu():
    head = Int8Linear.from_linear(torch.nn.Linear(16, 8, bias=False))
    x = torch.randn(2, 16).bfloat16()
    torch.testing.assert_close(head(x), reference(head, x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,N,B", [(4096, 128256, 1), (576, 49152, 4), (1000, 333, 16)])
def test_int8_gemv_matches_reference_cuda(n, N, B):
    head = Int8Linear.from_linear(torch.nn.Linear(n, N, bias=False)).cuda()
    x = torch.randn(B, n, device="cuda", dtype=torch.bfloat16)
    ref = reference(head, x.float())
    out = head(x)  # the custom op (tokens <= GEMV_MAX_TOKENS)
    torch.cuda.synchronize()
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        again = head(x)
    graph.replay()
    assert torch.equal(again, out)
