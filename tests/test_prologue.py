"""The decode step's prologue fusions: residual add + RMSNorm and the SiLU gate run inside T*.

* Under ``TRITON_INTERPRET=1``: ``launch_transform(prologue="add_norm")`` returns ``h + delta``
  exactly and the transform of ``gamma * RMSNorm(h + delta)`` that ``add_rms_norm`` followed by
  a plain launch gives (a q/k/v-style stack of members and a single layer, fp16 and bf16,
  padded widths; bf16 within the interpreter's truncating rounding); ``"silu_mul"`` the
  transform of ``silu(gate) * up``; bad prologue arguments are refused; both custom ops pass
  ``torch.library.opcheck``. A whole packed decode step through the kernels (fp16) matches
  the unfused step and transformers' forward.
* CPU: the step keeps the unfused path where the kernels do not run (torch backend).
* CUDA: a packed Llama's decode step with and without the fusions gives the same greedy tokens
  and logits within rounding, and the fused step is as close to the HF forward as the unfused
  one; the fused residual equals the unfused add exactly (bf16).
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from liftquant.engine import groups
from liftquant.engine import step as decode
from liftquant.kernels.int1_words import HAS_TRITON
from liftquant.kernels.policy import default_policy
from liftquant.models.adapters import LLAMA_ATTN_QKV
from tests.test_gemv_splitk import _run_interpreted
from tests.test_kernels import _fresh_registry, rand_layer, rel_err  # noqa: F401 (autouse)

PROLOGUE_CHECK = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    from liftquant.kernels import triton_int1 as ti
    from liftquant.engine.step import add_rms_norm
    from tests.test_kernels import rand_layer, rel_err

    def side(layers):
        if len(layers) == 1:
            m = layers[0]
            return m.s1, m.L, m.R, m.s2_act
        return tuple(torch.stack([getattr(m, k) for m in layers])
                     for k in ("s1", "L", "R", "s2_act"))

    for n, Ns, spec, dt in [(200, (24, 8, 8), "24to10", torch.float16),
                            (96, (33,), "20to8", torch.bfloat16),
                            (37, (9, 5), "12to5", torch.bfloat16)]:
        layers = [rand_layer(n, N, spec, bias=False, seed=N) for N in Ns]
        d, D = layers[0].spec.target_dim, layers[0].spec.lifted_dim
        s = side(layers)
        h, delta = torch.randn(2, n).to(dt), torch.randn(2, n).to(dt)
        gamma = (torch.rand(n) + 0.5).to(dt)
        h_ref, x_ref = add_rms_norm(h, delta, gamma, 1e-5)
        ref = ti.launch_transform(x_ref, *s, d=d, D=D, pairs=False)[0]
        out, _, h_new = ti.launch_transform(h, *s, d=d, D=D, pairs=False, prologue="add_norm",
                                            x2=delta, gamma=gamma, eps=1e-5)
        # exact in fp16; the interpreter rounds fp32 -> bf16 by truncation (the GPU to
        # nearest: the CUDA test checks bf16 exactly), so bf16 may differ by one unit
        tol = 0 if dt == torch.float16 else 2.0**-7
        assert ((h_new.float() - h_ref.float()).abs() <= tol * h_ref.float().abs()).all()
        assert rel_err(out, ref) < 1e-2, (spec, rel_err(out, ref))
        xp, wsc, _ = ti.launch_transform(h, *s, d=d, D=D, pairs=True, prologue="add_norm",
                                         x2=delta, gamma=gamma, eps=1e-5)
        assert xp.shape[0] == 2 * len(Ns)
        gate, up = torch.randn(2, n).to(dt), torch.randn(2, n).to(dt)
        ref = ti.launch_transform(F.silu(gate) * up, *s, d=d, D=D, pairs=False)[0]
        out = ti.launch_transform(gate, *s, d=d, D=D, pairs=False, prologue="silu_mul",
                                  x2=up)[0]
        assert rel_err(out, ref) < 1e-2, (spec, rel_err(out, ref))
    m = rand_layer(64, 16, "16to8")
    # the custom ops' schemas and fake implementations (what torch.compile and graphs see)
    h, delta = torch.randn(1, 64).half(), torch.randn(1, 64).half()
    side_m = (m.s1, m.L, m.R, m.s2_act)
    for op, args in [(torch.ops.liftquant.fused_norm_transform.default,
                      (h, delta, (torch.rand(64) + 0.5).half(), 1e-5, *side_m, 8, 16)),
                     (torch.ops.liftquant.fused_silu_transform.default,
                      (h, delta, *side_m, 8, 16))]:
        report = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in report.values()), report
    for kwargs, msg in [(dict(prologue="gelu"), "prologue"),
                        (dict(prologue="add_norm", x2=torch.zeros(1, 64)), "gamma"),
                        (dict(prologue="silu_mul"), "x2")]:
        try:
            ti.launch_transform(torch.zeros(1, 64), m.s1, m.L, m.R, m.s2_act, d=8, D=16,
                                pairs=True, **kwargs)
        except ValueError as err:
            assert msg in str(err), err
        else:
            raise AssertionError(kwargs)
    print("ok")
""")


STEP_CHECK = textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    from transformers import LlamaConfig, LlamaForCausalLM
    from liftquant.engine import groups, step as decode
    from liftquant.kernels import registry
    from liftquant.kernels.policy import default_policy
    from liftquant.models.adapters import LLAMA_ATTN_QKV, LLAMA_MLP_IN
    from tests.test_kernels import rand_layer, rel_err

    # every packed layer: T* + GEMV (no one-launch small path), so the prologues apply
    policies = {f: default_policy().replace(fused_small="0", fuse_prologues=f)
                for f in (True, False)}
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                      max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).half()  # fp16: the interpreter's bf16 is not exact
    shapes = {"q_proj": 64, "k_proj": 32, "v_proj": 32, "o_proj": 64, "gate_proj": 96,
              "up_proj": 96, "down_proj": 64}
    for i, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for name, N in shapes.items():
                if hasattr(parent, name):
                    n = 96 if name == "down_proj" else 64
                    setattr(parent, name, rand_layer(n, N, "8to4", bias=False, seed=i + N))
    model = model.eval()
    registry.set_backend(model, "triton", policy=policies[True])
    assert groups.takes_prologue(model.model.layers[0].mlp.down_proj,
                                 torch.zeros(1, 1, 96, dtype=torch.float16))
    ids = torch.randint(0, cfg.vocab_size, (1, 4))
    with torch.no_grad():
        hf = model(ids).logits.float()
    runs = {}
    for fuse in (True, False):
        registry.set_backend(model, "triton", policy=policies[fuse])
        down = model.model.layers[0].mlp.down_proj
        assert groups.takes_prologue(down, torch.zeros(1, 1, 96, dtype=torch.float16)) == fuse
        step = decode.DecodeStep(model, max_len=8)
        assert set(step.groups[0]) == {LLAMA_ATTN_QKV, LLAMA_MLP_IN}
        logits = []
        for t in range(ids.shape[1]):
            step.ids.copy_(ids[:, t:t + 1])
            logits.append(step().float())
        runs[fuse] = torch.cat(logits, 1)
    assert rel_err(runs[True], runs[False]) < 2e-2, rel_err(runs[True], runs[False])
    assert rel_err(runs[True], hf) < 3e-2, rel_err(runs[True], hf)
    print("ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_prologues_match_unfused_in_interpreter():
    _run_interpreted(PROLOGUE_CHECK)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_fused_decode_step_in_interpreter():
    """The whole step through the Triton kernels (grouped q/k/v and gate/up with the norm
    inside T*, the down projection with the SiLU gate inside T*) against the unfused step
    and the HF forward."""
    _run_interpreted(STEP_CHECK, timeout=600)


def test_step_keeps_the_unfused_path_on_cpu():
    layer = rand_layer(64, 16, "16to8")
    x = torch.zeros(1, 1, 64, dtype=torch.bfloat16)
    assert not groups.takes_prologue(layer, x)  # torch backend
    assert not groups.takes_prologue(torch.nn.Linear(64, 16), x)


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("hidden,inter", [(576, 1536), (768, 2048)])
def test_fused_step_matches_unfused_and_hf_cuda(hidden, inter, monkeypatch):
    from liftquant.engine.step import DecodeStep
    from liftquant.kernels import registry
    from tests.test_pdl import _packed_llama

    model = _packed_llama("20to8", hidden, inter)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), device="cuda")
    with torch.no_grad():
        hf = model(ids).logits.float()
    runs = {}
    for fuse in (True, False):  # every packed layer: T* + GEMV
        registry.set_backend(model, "triton", policy=default_policy().replace(
            fused_small="0", fuse_prologues=fuse))
        step = DecodeStep(model, max_len=16)
        assert groups.takes_prologue(model.model.layers[0].mlp.down_proj,
                                     torch.zeros(1, 1, inter, device="cuda",
                                                 dtype=torch.bfloat16)) == fuse
        logits = []
        for t in range(ids.shape[1]):
            step.ids.copy_(ids[:, t:t + 1])
            logits.append(step().float())
        runs[fuse] = torch.cat(logits, 1)
    # the residual the fused launch writes is exactly the unfused add
    group = step.groups[0][LLAMA_ATTN_QKV]
    h, delta = (torch.randn(1, 1, hidden, device="cuda", dtype=torch.bfloat16) for _ in "hd")
    weight = model.model.layers[0].input_layernorm.weight
    h_new, _ = group.add_norm_forward(h, delta, weight, 1e-5)
    assert torch.equal(h_new, decode.add_rms_norm(h, delta, weight, 1e-5)[0])
    assert rel_err(runs[True], runs[False]) < 2e-2
    # Against HF (its 12-token forward takes the GEMM path): the fused step is as close as the
    # unfused one; the gap itself is the GEMV's fp16 pair sums through three random layers.
    assert rel_err(runs[False], hf) < 0.15
    assert rel_err(runs[True], hf) < 1.2 * rel_err(runs[False], hf) + 1e-2
    agree = (runs[True].argmax(-1) == runs[False].argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
