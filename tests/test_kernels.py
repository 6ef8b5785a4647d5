"""Kernel backends against the torch reference (STYLE 2.8).

CPU: the reference equals the dense dequantized layer; registry fallbacks; the Triton kernels
under ``TRITON_INTERPRET=1`` in a subprocess (Triton picks interpreter mode when a kernel is
defined, so it cannot be switched inside this process); the benchmark decode step against the
HF forward. CUDA (skipped without a GPU): every backend against the reference, fp16 and bf16,
batch 1 (both GEMV kernels), 7 and 33, in_features not a multiple of d; every GEMV tuner
candidate; the tuner; the split-K GEMV replayed in a CUDA graph. The split-K kernel's CPU
checks are in ``test_gemv_splitk.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from liftquant.core.linear import PackedLiftLinear
from liftquant.kernels import registry, torch_ref

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parent.parent
# (in_features, out_features, lattice): d-multiples, non-multiples (padding), rows whose packed
# width is / is not a multiple of 16 bytes, odd row counts.
SHAPES = [(64, 16, "16to8"), (40, 12, "8to4"), (37, 9, "12to5"), (100, 24, "24to10"),
          (96, 33, "20to8"), (30, 11, "24to10")]


def rand_layer(n: int, N: int, spec: str, *, bias: bool = True, seed: int = 0,
               device: str = "cpu") -> PackedLiftLinear:
    """A PackedLiftLinear with random codes and side tensors (no calibration)."""
    g = torch.Generator().manual_seed(seed)
    layer = PackedLiftLinear(n, N, spec=spec, bias=bias)
    n1, n2 = layer.block_shape
    layer.packed_signs.copy_(torch.randint(0, 256, layer.packed_signs.shape, generator=g))
    layer.scale.copy_(torch.rand(N, generator=g) * 0.5 + 0.5)
    layer.s1.copy_(torch.rand(n, generator=g) + 0.5)
    layer.L.copy_(torch.randn(n1, n1, generator=g) / n1**0.5)
    layer.R.copy_(torch.randn(*layer.R.shape, generator=g) / n2**0.5)
    layer.s2_act.copy_(torch.rand(*layer.s2_act.shape, generator=g) + 0.5)
    if bias:
        layer.bias.copy_(torch.randn(N, generator=g))
    return layer.to(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def _fresh_registry():
    registry.reset()
    yield
    registry.reset()


# ------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("n,N,spec", SHAPES)
def test_torch_reference_matches_dense(n, N, spec):
    layer = rand_layer(n, N, spec, bias=N % 2 == 0)
    x = torch.randn(3, n)
    ref = torch_ref.dense_linear(layer, x)
    assert rel_err(torch_ref.linear(layer, x), ref) < 1e-5
    assert rel_err(layer(x), ref) < 1e-5  # forward dispatches to the reference on CPU


def test_pair_layout_round_trip():
    xs = torch.randn(2, 77)
    scale = torch.full((2, 3), 2.0**13)  # |xs| / scale <= 2^-10 keeps every y_p finite in fp16
    xp = torch_ref.pair_layout(xs, scale).view(torch.int32)  # (2, 16, 3)
    assert xp.shape == (2, 16, 3) and torch.isfinite(xp.view(torch.float16)).all()
    back = torch_ref.unpair(xp, scale, 77)
    assert rel_err(back, xs) < 1e-3


def test_auto_on_cpu_is_torch():
    assert registry.get_backend("auto", "cpu").name == "torch"
    assert registry.get_backend(device="cpu") is registry.get_backend("torch", "cpu")


def test_bitblas_missing_warns_once_and_falls_back():
    with pytest.warns(RuntimeWarning, match="bitblas"):
        backend = registry.get_backend("bitblas", "cpu")
    assert backend.name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.get_backend("bitblas", "cpu").name == "torch"  # no second warning
    layer = rand_layer(40, 12, "8to4")
    registry.set_backend(layer, "bitblas")
    x = torch.randn(2, 40)
    assert rel_err(layer(x), torch_ref.dense_linear(layer, x)) < 1e-5


def test_unknown_backend_lists_names():
    with pytest.raises(ValueError, match="auto, bitblas, torch, triton"):
        registry.get_backend("cutlass", "cpu")
    with pytest.raises(ValueError, match="torch"):
        registry.set_backend(nn.Sequential(rand_layer(40, 12, "8to4")), "nope")


def test_set_backend_counts_layers():
    model = nn.Sequential(rand_layer(40, 12, "8to4"), nn.ReLU(), rand_layer(12, 8, "8to4"))
    assert registry.set_backend(model, "torch") == 2
    assert all(m.backend == "torch" for m in model if isinstance(m, PackedLiftLinear))


def test_kernel_cache_keyed_by_shape():
    cache = registry.KernelCache("t")
    built = []
    for key in [(1, 2), (1, 2), (3, 4)]:
        cache.get(key, lambda: built.append(1) or len(built))
    assert len(cache) == 2 and len(built) == 2 and (3, 4) in cache


INTERPRETER_CHECK = textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    from liftquant.kernels import torch_ref, triton_int1 as ti
    from tests.test_kernels import SHAPES, rand_layer, rel_err
    # 16-byte rows; 12-byte rows; 9-byte rows (every byte offset) with a word count not / 4
    for i, (n, N, spec) in enumerate(SHAPES[i] for i in (0, 2, 5)):
        layer = rand_layer(n, N, spec, bias=i % 2 == 0, seed=i)
        side = (layer.s1, layer.L, layer.R, layer.s2_act)
        d, D = layer.spec.target_dim, layer.spec.lifted_dim
        x = torch.randn(2, n).half()
        ref_xs = layer.fused_input(x.float())
        xp, wsc = ti.launch_transform(x, *side, d=d, D=D, pairs=True)
        assert rel_err(torch_ref.unpair(xp, wsc, layer.lifted_width), ref_xs) < 3e-3
        xs, _ = ti.launch_transform(x, *side, d=d, D=D, pairs=False)
        assert rel_err(xs, ref_xs) < 3e-3
        dense = torch_ref.dense_linear(layer, x.float())
        cfg = ti.pick_gemv_config(N, xp.shape[-1], 132)
        out = ti.launch_gemv(xp, wsc, layer.packed_signs, layer.scale, layer.bias, torch.float16,
                             block_n=cfg.block_n, block_w=16, num_warps=1)
        assert out.dtype == torch.float16 and rel_err(out, dense) < 3e-3, (spec, rel_err(out, dense))
        out = ti.launch_gemm(xs, layer.packed_signs, layer.scale, layer.bias, block_m=16,
                             block_n=16, block_k=32)
        assert rel_err(out, dense) < 3e-3, (spec, rel_err(out, dense))
    print("ok")
""")


@pytest.mark.skipif(not __import__("liftquant.kernels.triton_int1", fromlist=["x"]).HAS_TRITON,
                    reason="Triton is not installed")
def test_triton_kernels_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------------------- CUDA
CUDA_SHAPES = [(4096, 1024, "24to10"), (1000, 333, "16to8"), (517, 130, "20to8"),
               (300, 77, "24to8"), (250, 64, "12to5")]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "bitblas"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,gemv", [(1, "splitk"), (1, "rowtile"), (7, "-"), (33, "-")])
@pytest.mark.parametrize("n,N,spec", CUDA_SHAPES)
def test_backend_matches_reference_cuda(backend, dtype, batch, gemv, n, N, spec, monkeypatch):
    # Batch 1 runs each GEMV kernel with its heuristic configuration (every tuner candidate is
    # checked in test_gemv_every_candidate_cuda); skipping the timing keeps builds few.
    from liftquant.kernels.policy import default_policy

    policy = default_policy().replace(tune=False, gemv_kind=gemv if batch == 1 else "auto")
    layer = rand_layer(n, N, spec, bias=N % 2 == 1, seed=n + batch, device="cuda")
    x = torch.randn(batch, n, device="cuda", dtype=dtype)
    ref = torch_ref.linear(layer, x)
    dense = torch_ref.dense_linear(layer, x.float())
    poison = torch.full((1 << 22,), float("nan"), device="cuda")  # unwritten outputs -> NaN
    del poison
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitblas: warns and falls back where it cannot build
        registry.set_backend(layer, backend, policy=policy)
        out = layer(x)
    torch.cuda.synchronize()
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, dense) < tol, rel_err(out, dense)
    assert rel_err(out, ref) < tol, rel_err(out, ref)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_custom_ops_opcheck_and_compile_cuda():
    from liftquant.kernels import triton_int1 as ti

    layer = rand_layer(1000, 256, "24to10", device="cuda")
    x = torch.randn(1, 1000, device="cuda", dtype=torch.bfloat16)
    side = (layer.s1, layer.L, layer.R, layer.s2_act)
    torch.library.opcheck(ti.fused_transform, (x, *side, 10, 24, True))
    xp, wsc = ti.fused_transform(x, *side, 10, 24, True)
    torch.library.opcheck(ti.int1_gemv, (xp, wsc, layer.packed_signs, layer.scale, layer.bias,
                                         torch.bfloat16))
    torch.library.opcheck(ti.fused_transform, (x, *side, 10, 24, True, True, False))
    xs = torch.randn(5, layer.lifted_width, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(ti.int1_gemm, (xs, layer.packed_signs, layer.scale, layer.bias))
    assert len(ti.GEMV_TUNER.cache) > 0  # the shape was tuned (or given the heuristic) once
    registry.set_backend(layer, "triton")
    compiled = torch.compile(layer, mode="reduce-overhead")
    for _ in range(3):
        out = compiled(x)
    assert rel_err(out, torch_ref.linear(layer, x)) < 2e-2


# Unaligned rows with a split that does not divide the 308 words; aligned rows, 700 rows.
GEMV_SHAPES = [(4096, 1024, "24to10"), (4096, 700, "16to8")]


def _gemv_inputs(n, N, spec, *, bias=True):
    from liftquant.kernels import triton_int1 as ti

    layer = rand_layer(n, N, spec, bias=bias, seed=N, device="cuda")
    x = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
    xp, wsc = ti.fused_transform(x, layer.s1, layer.L, layer.R, layer.s2_act,
                                 layer.spec.target_dim, layer.spec.lifted_dim, True)
    args = (xp, wsc, layer.packed_signs, layer.scale, layer.bias, torch.bfloat16)
    return layer, x, args


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,N,spec", GEMV_SHAPES)
def test_gemv_every_candidate_cuda(n, N, spec):
    """Every configuration the tuner may pick (both kernels, both word loops, plain Triton)."""
    from dataclasses import replace

    from liftquant.kernels import gemv_splitk as gs
    from liftquant.kernels import gemv_tuner as gt

    layer, x, args = _gemv_inputs(n, N, spec)
    ref = torch_ref.linear(layer, x)
    tuner = gt.GemvTuner()
    key = tuner.key(args[0], args[2], args[4], args[5])
    cands = tuner.candidates(key, torch.cuda.get_device_properties(0).multi_processor_count,
                             True)
    cands += [replace(cands[0], use_asm=False), replace(cands[-1], use_asm=False)]
    assert any(c.split(key[1]) > 1 for c in cands if isinstance(c, gs.SplitKConfig))
    failures = {}
    for cfg in cands:
        try:
            out = gt.launch_config(cfg, *args)
            torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001 - collect every failing candidate
            failures[cfg.label] = f"{type(err).__name__}: {str(err)[:300]}"
            continue
        err = rel_err(out, ref)
        if not torch.isfinite(out).all() or err > 2e-2:
            failures[cfg.label] = f"rel err {err:.3e}"
    assert not failures, failures
    counters = gs.WORKSPACES.current[str(x.device)][1]
    assert int(counters.abs().sum()) == 0  # every last-arriving program reset its counter


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gemv_tuner_cuda():
    """The tuner builds, checks and times every candidate; none may be rejected."""
    from liftquant.kernels import gemv_tuner as gt

    layer, x, args = _gemv_inputs(*GEMV_SHAPES[0])
    tuner = gt.GemvTuner()
    best = tuner.tune(args, rep_ms=5)
    key = tuner.key(args[0], args[2], args[4], args[5])
    assert not tuner.rejected[key], tuner.rejected[key]
    times = sorted(tuner.timings[key].items(), key=lambda kv: kv[1])
    print("GEMV candidates (us):", ", ".join(f"{k} {v:.1f}" for k, v in times[:8]))
    assert rel_err(gt.launch_config(best, *args), torch_ref.linear(layer, x)) < 2e-2


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_splitk_gemv_in_cuda_graph_cuda():
    """Replays reuse the workspace: counters reset themselves, results are bit-identical."""
    from liftquant.kernels import gemv_splitk as gs

    layer, x, args = _gemv_inputs(*GEMV_SHAPES[0])
    cfg = gs.SplitKConfig(64, 16, 64, 4)
    assert cfg.split(args[0].shape[-1]) == 5
    eager = gs.launch_gemv_splitk(*args, cfg=cfg)  # also allocates the workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [gs.launch_gemv_splitk(*args, cfg=cfg) for _ in range(3)]
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(o, eager) for o in outs)
    assert rel_err(eager, torch_ref.linear(layer, x)) < 2e-2
    assert int(gs.WORKSPACES.current[str(x.device)][1].abs().sum()) == 0


def test_decode_step_equals_hf_forward():
    """The benchmark's decode step (own KV cache, grouped-query attention, fused regions)
    reproduces transformers' Llama forward, dense and with a packed linear, token by token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from liftquant.engine.step import DecodeStep
    from liftquant.models.adapters import LLAMA_ATTN_QKV, LLAMA_MLP_IN

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                      max_position_embeddings=64, rope_theta=500000.0)
    model = LlamaForCausalLM(cfg).eval()
    model.model.layers[1].mlp.up_proj = rand_layer(64, 96, "8to4", bias=False, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        ref = model(ids).logits  # (1, 9, V)
    step = DecodeStep(model, max_len=12)
    logits = []
    for t in range(ids.shape[1]):
        step.ids.copy_(ids[:, t:t + 1])
        logits.append(step())
    torch.testing.assert_close(torch.cat(logits, 1), ref, atol=2e-5, rtol=2e-5)
    assert step.ids.item() == ref[0, -1].argmax().item() and step.pos.item() == 9
    # Packed q/k/v and gate/up in layer 0 form groups; the step still equals the HF forward.
    att, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for mod, name, n_in, n_out in ((att, "q_proj", 64, 64), (att, "k_proj", 64, 32),
                                   (att, "v_proj", 64, 32), (mlp, "gate_proj", 64, 96),
                                   (mlp, "up_proj", 64, 96)):
        setattr(mod, name, rand_layer(n_in, n_out, "8to4", bias=False, seed=n_out + len(name)))
    with torch.no_grad():
        ref = model(ids).logits
    step = DecodeStep(model, max_len=12)
    assert set(step.groups[0]) == {LLAMA_ATTN_QKV, LLAMA_MLP_IN} and step.groups[1] == {}
    logits = []
    for t in range(ids.shape[1]):
        step.ids.copy_(ids[:, t:t + 1])
        logits.append(step())
    torch.testing.assert_close(torch.cat(logits, 1), ref, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="--engine hf"):
        DecodeStep(SimpleNamespace(config=SimpleNamespace(model_type="gpt2")), max_len=4)
