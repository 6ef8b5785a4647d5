"""Programmatic dependent launch of the decode kernels (the planner's ``Plan.pdl``).

CPU: the planner keeps it off for CPU tensors, pre-Hopper GPUs and the interpreter, a bad
``LIFTQUANT_PDL`` is refused, and the launch keywords carry Triton's ``launch_pdl`` only when it is on. The PTX
checks (weights load before ``griddepcontrol.wait``, the transform triggers its dependent
before it waits) are in ``test_gemv_splitk.test_inline_ptx_kernels_build_for_sm90``.
CUDA (Hopper; skipped elsewhere): a packed Llama's graph-replayed decode step, in which every
transform and GEMV overlaps its neighbours, gives bit-identical logits and tokens with PDL on
and off, over many replays (a missing wait would show as a race).
"""

from __future__ import annotations

import pytest
import torch

from liftquant.kernels import int1_words
from tests.test_kernels import _fresh_registry, rand_layer  # noqa: F401 (autouse)


def test_switch_is_off_on_cpu():
    from liftquant.kernels.policy import KernelPolicy, Target, pdl_possible

    policy = KernelPolicy(pdl=True)
    assert not pdl_possible(Target("cpu", 0, True), policy)
    assert not pdl_possible(Target("cuda", 8, True), policy)  # Ampere: no PDL
    assert pdl_possible(Target("cuda", 9, True), policy)
    assert not pdl_possible(Target("cuda", 9, True), policy.replace(interpret=True))
    assert not pdl_possible(Target("cuda", 9, True), policy.replace(pdl=False))
    assert int1_words.pdl_launch(False) == {"PDL": False}
    assert int1_words.pdl_launch(True) == {"PDL": True, "launch_pdl": True}


def test_bad_environment_value_is_refused():
    from liftquant.kernels.policy import KernelPolicy

    with pytest.raises(ValueError, match="use 0 or 1"):
        KernelPolicy.from_env({"LIFTQUANT_PDL": "on"})
    assert KernelPolicy.from_env({"LIFTQUANT_PDL": "0"}).pdl is False


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def _packed_llama(spec: str, hidden: int, inter: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from liftquant.kernels import registry

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=3,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 192,
                      vocab_size=512, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden // 3),
              "v_proj": (hidden, hidden // 3), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    for i, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for name, (n, N) in shapes.items():
                if hasattr(parent, name):
                    setattr(parent, name, rand_layer(n, N, spec, bias=False, seed=i * 7 + N))
    model = model.cuda().eval()
    registry.set_backend(model, "triton")
    return model


@pytest.mark.skipif(not HOPPER, reason="needs a CUDA GPU of compute capability 9.0+")
@pytest.mark.parametrize("hidden,inter,fused", [(576, 1536, True), (576, 1536, False),
                                                (768, 2048, False)])
def test_decode_graph_same_with_and_without_pdl_cuda(hidden, inter, fused, monkeypatch):
    """576-wide layers with and without the one-launch small path (q/k/v, o, gate/up; down
    runs T* + split-K GEMV), 768-wide ones T* + split-K GEMV everywhere. The small path is
    forced on (``fused_small="1"``) in both runs: under ``auto`` the planner turns it off where
    PDL launches, so the two runs would compare different kernels, not PDL on and off."""
    from liftquant.engine.graph import GraphedDecode
    from liftquant.engine.step import DecodeStep
    from liftquant.kernels import registry
    from liftquant.kernels.policy import default_policy

    runs = {}
    for pdl in (False, True):
        model = _packed_llama("20to8", hidden, inter)
        registry.set_backend(model, "triton", policy=default_policy().replace(
            pdl=pdl, fused_small="1" if fused else "0"))
        step = DecodeStep(model, max_len=96, compile_mode=None)
        step.ids.fill_(7)
        graphed = GraphedDecode(step, warmup=4)
        step.ids.fill_(7)
        step.pos.fill_(4)
        logits, ids = [], []
        for _ in range(48):
            graphed.graph.replay()
            logits.append(graphed.logits.clone())
            ids.append(step.ids.item())
        runs[pdl] = (torch.cat(logits), ids)
    assert runs[True][1] == runs[False][1]
    assert torch.equal(runs[True][0], runs[False][0])
