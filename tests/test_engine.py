"""The engines (``liftquant.engine``) on CPU: one interface, the same greedy tokens as
``model.generate``; the step engine's module paths from the adapter and its batched prefill;
the CPU dense weight cache (``kernels.dense``): equal logits, chosen only when it fits."""

from __future__ import annotations

import logging

import pytest
import torch

from liftquant.engine import HFEngine, StepEngine, build_engine, prepare_model, step_layout
from liftquant.kernels import dense, registry
from liftquant.kernels.policy import KernelPolicy
from tests.test_kernels import _fresh_registry, rand_layer, rel_err  # noqa: F401 (autouse)

SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
          "gate_proj": (64, 96), "up_proj": (64, 96), "down_proj": (96, 64)}


def packed_llama(seed: int = 0, spec: str = "8to4"):
    """A tiny Llama (2 layers, GQA) with every decoder linear packed (random codes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                      max_position_embeddings=64, rope_theta=500000.0)
    model = LlamaForCausalLM(cfg).eval()
    for i, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for name, (n, N) in SHAPES.items():
                if hasattr(parent, name):
                    setattr(parent, name, rand_layer(n, N, spec, bias=False, seed=7 * i + N))
    return model


def greedy(engine, prompt: torch.Tensor, n: int) -> list[int]:
    token = engine.prefill(prompt).argmax(-1)
    out = [int(token)]
    for _ in range(n - 1):
        token = engine.next(token).argmax(-1)
        out.append(int(token))
    return out


@pytest.fixture(scope="module")
def model_and_ref():
    model = packed_llama()
    prompt = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                             do_sample=False, pad_token_id=0)[0, 7:].tolist()
    return model, prompt, ref


@pytest.mark.parametrize("kind", ["step", "hf"])
def test_engines_match_generate(model_and_ref, kind):
    model, prompt, ref = model_and_ref
    engine = build_engine(model, kind, max_len=32)
    assert engine.name == kind
    assert greedy(engine, prompt, 8) == ref
    # a second context restarts cleanly; warm-up leaves no state behind
    assert engine.warm_up(prompt_len=5, steps=2) >= 0
    assert greedy(engine, prompt, 8) == ref


def test_step_prefill_is_one_batched_pass_equal_to_hf(model_and_ref, monkeypatch):
    model, prompt, _ = model_and_ref
    engine = StepEngine(model, 32)
    calls = []
    q = model.model.layers[0].self_attn.q_proj
    orig = type(q).forward
    monkeypatch.setattr(type(q), "forward", lambda self, x: calls.append(x.shape) or orig(self, x))
    logits = engine.prefill(prompt)
    assert calls[0] == (1, 7, 64) and len(calls) == 2 * 7  # 7 packed linears x 2 layers, once
    assert int(engine.step.pos) == 7
    with torch.no_grad():
        ref = model(prompt).logits[:, -1]
    torch.testing.assert_close(logits, ref, atol=2e-5, rtol=2e-5)


def test_step_layout_comes_from_the_adapter(model_and_ref):
    from liftquant.models import get_adapter

    model, _, _ = model_and_ref
    adapter = get_adapter(model.config)
    lay = step_layout(model)
    assert lay.blocks == adapter.blocks and lay.lm_head == adapter.lm_head
    assert (lay.qkv, (lay.o,), lay.gate_up, (lay.down,)) == tuple(adapter.groups)
    assert dict(adapter.norm_fusion) == {lay.attn_norm: 0, lay.mlp_norm: 2}


def test_step_engine_refuses_what_it_does_not_reproduce():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50, head_dim=16)
    qwen3 = Qwen3ForCausalLM(cfg)
    with pytest.raises(ValueError, match="q/k norms.*--engine hf"):
        step_layout(qwen3)
    assert build_engine(qwen3, "auto", max_len=8).name == "hf"
    with pytest.raises(ValueError, match="engine"):
        build_engine(qwen3, "vllm", max_len=8)


# ------------------------------------------------------------------------ dense cache
def test_dense_cache_logits_equal_the_packed_path(model_and_ref):
    model, prompt, _ = model_and_ref
    with torch.no_grad():
        packed = model(prompt).logits
    decision = dense.enable_dense_cache(model, policy=KernelPolicy(dense_cache="1"))
    try:
        assert decision.use and decision.bytes == 2 * 4 * sum(n * N for n, N in SHAPES.values())
        layer = model.model.layers[0].mlp.down_proj
        assert registry.get_backend("torch", "cpu").plan_for(layer, prompt.float()).path == \
            "dense"
        with torch.no_grad():
            cached = model(prompt).logits
        assert rel_err(cached, packed) < 1e-5  # the reference tolerance of test_kernels
        assert "dense_weight" not in "".join(model.state_dict())  # the checkpoint is unchanged
    finally:
        dense.drop_dense_cache(model)


def test_dense_cache_is_chosen_only_when_it_fits(model_and_ref, caplog):
    model, _, _ = model_and_ref
    need = dense.dense_cache_bytes(model, torch.float32)
    cpu = torch.device("cpu")
    auto = KernelPolicy()  # dense_cache="auto", half the available memory
    fits = dense.dense_cache_decision(model, dtype=torch.float32, device=cpu, policy=auto,
                                      available=2 * need)
    tight = dense.dense_cache_decision(model, dtype=torch.float32, device=cpu, policy=auto,
                                       available=2 * need - 1)
    assert fits.use and not tight.use and "does not fit" in tight.reason
    off = dense.dense_cache_decision(model, dtype=torch.float32, device=cpu,
                                     policy=KernelPolicy(dense_cache="0"), available=1 << 40)
    assert not off.use
    gpu = dense.dense_cache_decision(model, dtype=torch.float32, device=torch.device("cuda"),
                                     policy=auto, available=1 << 40)
    assert not gpu.use
    with caplog.at_level(logging.INFO, logger="liftquant"):
        decision = prepare_model(model, policy=auto, available=need)  # budget need / 2
    assert not decision.use and model.model.layers[0].mlp.up_proj.dense_weight is None
    assert "dense weight cache off" in caplog.text
    with caplog.at_level(logging.INFO, logger="liftquant"):
        assert prepare_model(model, policy=auto, available=4 * need).use
    assert "dense weight cache on" in caplog.text
    dense.drop_dense_cache(model)


def test_hf_engine_interface_positions(model_and_ref):
    model, prompt, _ = model_and_ref
    engine = HFEngine(model, 32)
    engine.prefill(prompt)
    assert engine.position == 7
    engine.next(torch.tensor([3]))
    assert engine.position == 8
    engine.reset()
    assert engine.position == 0


def test_batched_step_equals_hf_per_sequence(model_and_ref):
    """batch 2: prefill and two decode steps equal the HF forward of each sequence."""
    from liftquant.engine import DecodeStep

    model, _, _ = model_and_ref
    ids = torch.randint(0, 101, (2, 6), generator=torch.Generator().manual_seed(5))
    step = DecodeStep(model, 16, batch=2)
    logits = [step.prefill(ids[:, :4])[:, -1]]
    for t in (4, 5):
        step.ids.copy_(ids[:, t:t + 1])
        logits.append(step()[:, -1])
    with torch.no_grad():
        ref = model(ids).logits  # (2, 6, V)
    for j, t in enumerate((3, 4, 5)):
        torch.testing.assert_close(logits[j], ref[:, t], atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="batch"):
        step.prefill(ids[:1])


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_step_engine_graph_equals_eager_and_tracks_hf_cuda():
    """The graphed step (compiled regions, one CUDA graph, Triton decode kernels chosen by the
    planner) replays exactly what the same compiled step computes without the graph; compiled
    and eager steps agree to bf16 rounding (inductor fuses the norms and rotary differently, so
    bit equality between them is not a property of torch.compile: measured on the H200 they
    differ in single bf16 ulps); all stay close to the HF forward."""
    model = packed_llama(spec="16to8").cuda().to(torch.bfloat16)
    registry.set_backend(model, "triton")
    prompt = torch.randint(0, 101, (1, 7), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(3))

    # the same next tokens for every engine, so a one-ulp difference cannot change the path
    tokens = torch.randint(0, 101, (6, 1), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(4))

    def run(engine):
        logits = [engine.prefill(prompt)]
        for token in tokens:
            logits.append(engine.next(token))
        return torch.cat(logits)

    engine = StepEngine(model, 32, compile=True)
    graphed = run(engine)
    assert engine.graph is not None  # the decode steps were graph replays
    ungraphed = StepEngine(model, 32, compile=True)
    ungraphed.use_graph = False
    assert torch.equal(graphed, run(ungraphed))
    eager = run(StepEngine(model, 32, compile=False))
    assert rel_err(graphed.float(), eager.float()) < 0.02
    hf = run(HFEngine(model, 32))
    assert rel_err(graphed.float(), hf.float()) < 0.15


def test_step_engine_with_the_embedding_on_the_host(model_and_ref):
    """host_embed: the table leaves the model's device for host memory, the step reads its
    rows through the fed input buffer, and the greedy tokens equal generate's; a head that
    shares the table is refused."""
    _, prompt, ref = model_and_ref
    model = packed_llama()
    engine = StepEngine(model, 32, host_embed=True)
    table = engine.step.host_table
    assert table is not None and table.device.type == "cpu"
    assert model.get_input_embeddings().weight.data_ptr() == table.data_ptr()
    assert greedy(engine, prompt, 8) == ref
    assert engine.warm_up(prompt_len=5, steps=2) >= 0
    assert greedy(engine, prompt, 8) == ref
    tied = packed_llama()
    tied.lm_head.weight = tied.get_input_embeddings().weight
    with pytest.raises(ValueError, match="shares the embedding table"):
        StepEngine(tied, 32, host_embed=True)


def test_graphed_step_with_the_embedding_on_the_host_cuda():
    """On CUDA the host table is pinned, the embedding's device copy is freed, and the
    graphed step fed from the host replays bit for bit what the graphed step with the table
    on the device computes."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    prompt = torch.randint(0, 101, (1, 7), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(3))
    tokens = torch.randint(0, 101, (6, 1), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(4))

    def run(host_embed):
        model = packed_llama(spec="16to8").cuda().to(torch.bfloat16)
        registry.set_backend(model, "triton")
        engine = StepEngine(model, 32, compile=True, host_embed=host_embed)
        logits = [engine.prefill(prompt)]
        for token in tokens:
            logits.append(engine.next(token))
        assert engine.graph is not None
        if host_embed:
            assert engine.step.host_table.is_pinned()
            assert model.get_input_embeddings().weight.device.type == "cpu"
        return torch.cat(logits)

    assert torch.equal(run(True), run(False))
