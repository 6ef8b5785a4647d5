"""Mixture-of-Experts families (Mixtral, Qwen3-MoE, Qwen3.5-MoE): every expert quantized.

Tiny random configs (hidden 64, 2 layers, 4 experts) built with the transformers classes. The
fused 3-D experts are unfused into per-expert linears (liftquant.models.moe), each a LiftQuant
matrix calibrated on the tokens routed to it; the router stays FP.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from liftquant.cli.config import CalibArgs, LatticeArgs, RunConfig, TrainArgs
from liftquant.core.lattice import LatticeSpec, load_projection
from liftquant.core.linear import PackedLiftLinear
from liftquant.io.checkpoint import (
    load_quantized,
    packed_module_names,
    quantization_config,
    save_quantized,
)
from liftquant.models import get_adapter
from liftquant.models.adapters import UnsupportedFamilyError
from liftquant.models.moe import ExpertList, unfuse_experts
from liftquant.quantize.calibrate import quantize_model

SPEC = LatticeSpec.parse("8to4")
TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
N_EXPERTS = 4


def tiny_moe(model_type: str, seed: int = 0, top_k: int = 2):
    import transformers as tf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_type == "mixtral":
            model = tf.MixtralForCausalLM(tf.MixtralConfig(
                **TINY, num_local_experts=N_EXPERTS, num_experts_per_tok=top_k))
        elif model_type == "qwen3_moe":
            model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
                **TINY, num_experts=N_EXPERTS, num_experts_per_tok=top_k,
                moe_intermediate_size=32, head_dim=16))
        else:
            model = tf.Qwen3_5MoeForCausalLM(tf.Qwen3_5MoeTextConfig(
                **TINY, num_experts=N_EXPERTS, num_experts_per_tok=top_k,
                moe_intermediate_size=32, shared_expert_intermediate_size=32, head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1 and "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    return model.float().eval()


def _ids(n=12, seq=32, seed=1):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _quantize(model, lattice_dir, epochs=1):
    cfg = RunConfig(calib=CalibArgs(nsamples=12, seqlen=32, batch_size=2, seed=0),
                    lattice=LatticeArgs(expc="8to4"), train=TrainArgs(epochs=epochs, holdout=2))
    ids = _ids()
    rows = quantize_model(model, ids, cfg=cfg, M=load_projection(SPEC, lattice_dir), spec=SPEC,
                          adapter=get_adapter(model.config), device=torch.device("cpu"))
    return rows, ids


def _save(model, path, lattice_dir):
    qc = quantization_config(spec=SPEC, M=load_projection(SPEC, lattice_dir),
                             quantized_modules=packed_module_names(model),
                             not_converted=list(get_adapter(model.config).skip))
    return save_quantized(model, None, path, qconfig=qc)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "qwen3_5_moe_text"])
def test_unfused_experts_compute_the_same(model_type):
    model = tiny_moe(model_type)
    ids = _ids(2, 16)
    with torch.no_grad():
        want = model(ids).logits
        names = unfuse_experts(model)
        got = model(ids).logits
    assert len(names) == 2 and isinstance(model.get_submodule(names[0]), ExpertList)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert unfuse_experts(model) == []  # idempotent


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_5_moe_text"])
def test_moe_quantize_save_reload_strict(model_type, tiny_lattice_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import liftquant  # noqa: F401  (registers from_pretrained support)

    model = tiny_moe(model_type)
    router = {k: v.clone() for k, v in model.state_dict().items() if ".mlp.gate." in k
              or "shared_expert_gate" in k}
    rows, ids = _quantize(model, tiny_lattice_dir)
    names = packed_module_names(model)
    if model_type == "qwen3_5_moe_text":  # linear attention (3) + full attention (4), shared
        assert len(names) == 3 + 4 + 2 * (3 * N_EXPERTS + 3)
        assert "model.layers.0.mlp.shared_expert.down_proj" in names
        assert "model.layers.0.linear_attn.in_proj_b" not in names
    else:
        assert len(names) == 2 * (4 + 3 * N_EXPERTS)
    for e in range(N_EXPERTS):
        for lin in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.mlp.experts.{e}.{lin}" in names
    state = model.state_dict()
    for key, value in router.items():  # the router stays full precision, untouched
        assert torch.equal(state[key], value), key
    assert all(r["holdout_packed"] < 1.0 for r in rows)
    ckpt = _save(model, tmp_path / "ckpt", tiny_lattice_dir)
    loaded, _ = load_quantized(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        want = model(ids[:2]).logits
        assert torch.equal(loaded(ids[:2]).logits, want)
        assert torch.equal(hf(ids[:2]).logits, want)
    out = loaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_expert_without_tokens_still_quantizes_and_is_reported(tiny_lattice_dir, tmp_path):
    """Top-1 routing with expert 3 of block 0 never chosen during calibration: it keeps s1 = 1,
    is rounded from its initial transform, packed, and named in the report row."""
    model = tiny_moe("qwen3_moe", top_k=1)
    gate = model.model.layers[0].mlp.gate

    def never_expert_3(_module, _args, out):
        logits, scores, index = out
        return logits, scores, torch.where(index == 3, torch.zeros_like(index), index)

    handle = gate.register_forward_hook(never_expert_3)
    try:
        rows, ids = _quantize(model, tiny_lattice_dir)
    finally:
        handle.remove()
    assert rows[0]["experts_without_tokens"] == ["mlp.experts.3"]
    assert "experts_without_tokens" not in rows[1]
    packed = model.model.layers[0].mlp.experts[3].gate_proj
    assert isinstance(packed, PackedLiftLinear)
    assert torch.equal(packed.s1, torch.ones_like(packed.s1))
    loaded, _ = load_quantized(_save(model, tmp_path / "c", tiny_lattice_dir))
    with torch.no_grad():  # expert 3 is routed to at inference (the hook is gone)
        assert torch.equal(loaded(ids[:2]).logits, model(ids[:2]).logits)


def test_adapters_and_refusal():
    for model_type in ("mixtral", "qwen3_moe", "qwen3_5_moe", "qwen3_5_moe_text"):
        adapter = get_adapter(model_type)
        assert not adapter.fuse_norms and model_type in adapter.model_types
    assert get_adapter("qwen3_5_moe").blocks == "model.language_model.layers"
    with pytest.raises(UnsupportedFamilyError, match="MoE quantization is not supported yet") as e:
        get_adapter(SimpleNamespace(model_type="qwen2_moe"))
    assert isinstance(e.value, ValueError)  # main.py reports it in one line
    assert all(t in str(e.value) for t in ("mixtral", "qwen3_moe", "qwen3_5_moe"))


def test_qwen3_5_moe_with_vision_tower_round_trip(tiny_lattice_dir, tmp_path):
    import transformers as tf

    text = {**TINY, "num_experts": N_EXPERTS, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "head_dim": 16,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
            "linear_value_head_dim": 16, "layer_types": ["linear_attention", "full_attention"]}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
              "out_hidden_size": 64, "patch_size": 4, "spatial_merge_size": 1,
              "temporal_patch_size": 1, "num_position_embeddings": 16}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.Qwen3_5MoeForConditionalGeneration(
            tf.Qwen3_5MoeConfig(text_config=text, vision_config=vision)).float().eval()
    assert get_adapter(model.config).model_types == ("qwen3_5_moe",)
    visual = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    _, ids = _quantize(model, tiny_lattice_dir)
    names = packed_module_names(model)
    assert len(names) == 3 + 4 + 2 * (3 * N_EXPERTS + 3)
    assert all(n.startswith("model.language_model.layers.") for n in names)
    loaded, _ = load_quantized(_save(model, tmp_path / "vlm", tiny_lattice_dir))
    assert type(loaded).__name__ == "Qwen3_5MoeForConditionalGeneration"
    for key, value in loaded.model.visual.state_dict().items():
        assert torch.equal(value, visual[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(ids[:2]).logits, model(ids[:2]).logits)


def test_expert_routing_equals_the_per_expert_mask_loop():
    """ExpertList's one-sync routing (stable sort by expert) gives bit-identically the output of
    the per-expert mask loop it replaced, dropped tokens (index E) and empty experts included."""
    from torch import nn

    from liftquant.models.moe import ExpertList, ExpertMLP

    torch.manual_seed(0)
    E, H, inter, T, k = 9, 16, 8, 50, 3
    experts = ExpertList([ExpertMLP(H, inter, nn.SiLU()) for _ in range(E)])
    x, w = torch.randn(T, H), torch.rand(T, k)
    idx = torch.randint(0, E + 1, (T, k))
    idx[idx == 4] = 5  # expert 4 receives no token
    ref = torch.zeros_like(x)
    mask = nn.functional.one_hot(idx, num_classes=E + 1).permute(2, 1, 0)
    with torch.no_grad():
        for e in range(E):
            pos, tok = torch.where(mask[e])
            ref.index_add_(0, tok, experts[e](x[tok]) * w[tok, pos, None])
        assert torch.equal(experts(x, idx, w), ref)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_5_moe_text"])
def test_moe_beats_rtn_and_chats(model_type, tiny_lattice_dir, tmp_path):
    """At 2 bits/weight (codes) the quantized MoE is closer to the FP model than per-channel RTN
    at 2 bits on the final logits, and the chat's HF engine decodes its checkpoint greedily
    exactly as ``generate`` does (the step engine is Llama-only and refused)."""
    import io

    from conftest import make_tokenizer

    from liftquant.apps.chat import ChatSession, load_chat_model, parse_args
    from liftquant.quantize import baselines as B

    model = tiny_moe(model_type)
    _, ids = _quantize(model, tiny_lattice_dir)
    with torch.no_grad():
        want = tiny_moe(model_type)(ids[:4]).logits

    def rel(m):
        with torch.no_grad():
            return float((m(ids[:4]).logits - want).square().mean() / want.square().mean())

    base = tiny_moe(model_type)
    weights, _ = B.quantize_baseline(base, ids, spec=B.BaselineSpec("rtn", bits=2, group_size=0),
                                     adapter=get_adapter(base.config),
                                     device=torch.device("cpu"), batch_size=2)
    assert len(weights) == len(packed_module_names(model))  # every expert matrix, both methods
    assert rel(model) < rel(base), (rel(model), rel(base))

    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> "
                         "{% endfor %}{% if add_generation_prompt %}assistant {% endif %}")
    qc = quantization_config(spec=SPEC, M=load_projection(SPEC, tiny_lattice_dir),
                             quantized_modules=packed_module_names(model),
                             not_converted=list(get_adapter(model.config).skip))
    ckpt = save_quantized(model, tok, tmp_path / "chat", qconfig=qc)
    args, _ = parse_args(["--quant_model_path", str(ckpt), "--device", "cpu", "--backend",
                          "torch", "--max_cache_len", "64", "--max_new_tokens", "5"])
    qmodel, qtok, device = load_chat_model(args)
    session = ChatSession(qmodel, qtok, args, device, out=io.StringIO())
    assert session.engine == "hf"
    session.ask("the quick fox")
    prompt = qtok("user the quick fox </s> assistant", return_tensors="pt").input_ids
    ref = qmodel.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                          do_sample=False, pad_token_id=0, eos_token_id=2)[0, prompt.shape[1]:]
    got = list(session.last_token_ids)
    assert got and got == [t for t in ref.tolist() if t != 2][:len(got)]
    args_step, _ = parse_args(["--quant_model_path", str(ckpt), "--device", "cpu",
                               "--engine", "step"])
    with pytest.raises(ValueError, match="engine hf"):
        ChatSession(qmodel, qtok, args_step, device, out=io.StringIO())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_moe_baseline_run_saves_and_reloads(method, tmp_path, tiny_lattice_dir):
    """``--method rtn|gptq`` on a MoE model: the run unfuses the experts as LiftQuant's does,
    quantizes every expert matrix, and its checkpoint reloads strictly to the same logits."""
    from liftquant.apps.api import run_quantization
    from liftquant.cli.config import RunArgs
    from liftquant.quantize import methods

    model = tiny_moe("qwen3_moe")
    ids = _ids(8, 32)
    cfg = RunConfig(calib=CalibArgs(nsamples=8, seqlen=32, batch_size=4),
                    lattice=LatticeArgs(method=method, expc="8to4",
                                        lattice_dir=str(tiny_lattice_dir), baseline_bits=3,
                                        group_size=16),
                    train=TrainArgs(epochs=0, holdout=2),
                    run=RunArgs(save_dir=str(tmp_path / method), backend="torch"))
    run_quantization(cfg, model=model, tokenizer=None, calib_ids=ids)
    loaded, _ = methods.load_checkpoint(tmp_path / method, backend="torch")
    names = {n for n, m in loaded.named_modules() if n.endswith(("gate_proj", "up_proj",
                                                                   "down_proj"))}
    assert {f"model.layers.1.mlp.experts.{e}.down_proj" for e in range(N_EXPERTS)} <= names
    with torch.no_grad():
        assert torch.equal(loaded(ids[:2]).logits, model(ids[:2]).logits)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "qwen3_5_moe_text"])
def test_memory_plan_counts_routed_tokens_of_experts(model_type):
    """Every token visits top_k of the experts, so each expert linear's activation terms are
    scaled by top_k / experts (shared experts, attention: 1) and only those terms shrink;
    a router without a readable top_k leaves the experts at every token."""
    from liftquant.quantize.plan import (
        ACTIVATION_FACTOR,
        estimate_bytes,
        linear_shapes,
        token_shares,
    )

    top_k = 2
    model = tiny_moe(model_type, top_k=top_k)
    unfuse_experts(model)
    adapter = get_adapter(model.config)
    block = adapter.get_blocks(model)[0]
    names = adapter.linear_names(block)
    shares = token_shares(block, adapter)
    experts = [n for n in names if ".experts." in f".{n}"]
    assert len(experts) == 3 * N_EXPERTS
    for name, f in zip(names, shares, strict=True):
        assert f == (top_k / N_EXPERTS if name in experts else 1.0), name
    shapes = linear_shapes(block, adapter)
    kw = {"spec": SPEC, "tokens": 4096, "micro_tokens": 4096, "compute_bytes": 2,
          "weight_bytes": 4, "other_bytes": 0, "cand_fraction": 0.01, "checkpoint_proxy": False}
    full, routed = estimate_bytes(shapes, **kw), estimate_bytes(shapes, shares=shares, **kw)
    saved_io = sum((1 - f) * (o + i) for f, (o, i) in zip(shares, shapes, strict=True))
    assert full["search"] == routed["search"]  # weights only
    assert full["stage1"] - routed["stage1"] == pytest.approx(
        ACTIVATION_FACTOR * 4096 * saved_io * 2, abs=2)
    assert full["targets"] - routed["targets"] == pytest.approx(2 * 4096 * saved_io * 2, abs=2)
    assert routed["stage2"] < full["stage2"]
    moe = block.get_submodule(experts[0].split(".experts.")[0])
    for m in (moe, *moe.children()):  # hide the router's top_k
        for attr in ("top_k", "num_experts_per_tok"):
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, None)
    assert token_shares(block, adapter) == [1.0] * len(names)
