"""Qwen3.5 (hybrid Gated DeltaNet / gated full attention), text-only and with its vision tower.

Tiny random configs (hidden 64, 4 layers mixing both layer types, vocab 256) built with the
transformers classes; the linear-attention path runs transformers' torch fallback on CPU (no
flash-linear-attention / causal-conv1d kernels needed).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers.models.qwen3_5")

from liftquant.cli.config import CalibArgs, LatticeArgs, RunConfig, TrainArgs
from liftquant.core.lattice import LatticeSpec, load_projection
from liftquant.core.linear import PackedLiftLinear
from liftquant.evaluation.eval import perplexity
from liftquant.io.checkpoint import (
    bits_report,
    load_quantized,
    packed_module_names,
    quantization_config,
    save_quantized,
)
from liftquant.models import get_adapter
from liftquant.quantize.cache import ActivationCache
from liftquant.quantize.calibrate import quantize_model
from liftquant.quantize.capture import capture_block_inputs, kwargs_for_block, run_block

SPEC = LatticeSpec.parse("8to4")
LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
TEXT = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "layer_types": LAYER_TYPES,
        "max_position_embeddings": 256}
VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
          "out_hidden_size": 64, "patch_size": 4, "spatial_merge_size": 1,
          "temporal_patch_size": 1, "num_position_embeddings": 16}
LINEAR_BLOCK = ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FULL_BLOCK = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FP_IN_LINEAR_BLOCK = ("linear_attn.in_proj_b", "linear_attn.in_proj_a", "linear_attn.conv1d")


def _perturb(model):
    """Non-trivial norms (Qwen3.5's RMSNorm is x/rms * (1 + w), w initialised to 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_qwen3_5(seed: int = 0, *, vision: bool = False, attn: str = "sdpa", **text):
    from transformers import (
        Qwen3_5Config,
        Qwen3_5ForCausalLM,
        Qwen3_5ForConditionalGeneration,
        Qwen3_5TextConfig,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if vision:
            config = Qwen3_5Config(text_config={**TEXT, **text}, vision_config=VISION)
            config._attn_implementation = attn
            model = Qwen3_5ForConditionalGeneration(config)
        else:
            config = Qwen3_5TextConfig(**{**TEXT, **text})
            config._attn_implementation = attn
            model = Qwen3_5ForCausalLM(config)
        return _perturb(model.float())


def _cfg():
    return RunConfig(calib=CalibArgs(nsamples=12, seqlen=32, batch_size=2, seed=0),
                     lattice=LatticeArgs(expc="8to4"),
                     train=TrainArgs(epochs=2, holdout=2))


def _ids(n=12, seq=32, seed=1):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _quantize(model, lattice_dir):
    ids = _ids()
    rows = quantize_model(model, ids, cfg=_cfg(), M=load_projection(SPEC, lattice_dir), spec=SPEC,
                          adapter=get_adapter(model.config), device=torch.device("cpu"))
    return rows, ids


def _save_load(model, tmp_path, lattice_dir, adapter):
    qc = quantization_config(spec=SPEC, M=load_projection(SPEC, lattice_dir),
                             quantized_modules=packed_module_names(model),
                             not_converted=list(adapter.skip))
    save_quantized(model, None, tmp_path / "ckpt", qconfig=qc)
    loaded = load_quantized(tmp_path / "ckpt")[0]
    # the attention implementation is a runtime choice, not part of the checkpoint
    loaded.set_attn_implementation(model.config._attn_implementation)
    return loaded


def _from_pretrained(cls_name, path, attn):
    import transformers

    import liftquant  # noqa: F401  (registers the "liftquant" quantization method)

    model = getattr(transformers, cls_name).from_pretrained(path, attn_implementation=attn)
    return model.eval()


# ------------------------------------------------------------------------------ adapters
def test_adapters_pick_groups_per_layer_type():
    model = tiny_qwen3_5(num_hidden_layers=2, layer_types=LAYER_TYPES[:2])
    adapter = get_adapter(model.config)
    assert adapter.model_types == ("qwen3_5_text",) and not adapter.fuse_norms
    blocks = adapter.get_blocks(model)
    assert adapter.linear_names(blocks[0]) == LINEAR_BLOCK
    assert adapter.linear_names(blocks[1]) == FULL_BLOCK
    vlm = get_adapter("qwen3_5")
    assert vlm.blocks == "model.language_model.layers" and "model.visual" in vlm.skip


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_capture_gives_each_layer_type_its_kwargs(attn):
    """Eager attention blocks need the 4-D causal mask, linear-attention blocks get None:
    replaying block 0's kwargs everywhere would make the attention blocks non-causal."""
    model = tiny_qwen3_5(attn=attn)
    adapter = get_adapter(model.config)
    ids = _ids(3, 12)
    cache = ActivationCache(3, 12, 64, dtype=torch.float32)
    kwargs = capture_block_inputs(model, adapter, ids, cache=cache, batch_size=3)
    blocks = adapter.get_blocks(model)
    if attn == "eager":
        assert sorted(kwargs.per_block) == [1, 3]
        assert kwargs["attention_mask"] is None
        assert kwargs_for_block(kwargs, 1)["attention_mask"].ndim == 4
    with torch.no_grad():
        x = cache[:]
        for i, block in enumerate(blocks):
            x = run_block(block, x, kwargs_for_block(kwargs, i))
        logits = model.lm_head(model.model.norm(x))
        torch.testing.assert_close(logits, model(ids).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def quantized_text(tiny_lattice_dir):
    model = tiny_qwen3_5(attn="eager")
    fp = {k: v.clone() for k, v in model.state_dict().items()}
    rows, ids = _quantize(model, tiny_lattice_dir)
    return model, fp, rows, ids


def test_text_model_every_target_packed_rest_untouched(quantized_text):
    model, fp, rows, _ = quantized_text
    adapter = get_adapter(model.config)
    packed = set(packed_module_names(model))
    want = {f"model.layers.{i}.{n}" for i, t in enumerate(LAYER_TYPES)
            for n in (LINEAR_BLOCK if t == "linear_attention" else FULL_BLOCK)}
    assert packed == want
    for i, block in enumerate(adapter.get_blocks(model)):
        for name in adapter.linear_names(block):
            assert isinstance(adapter.get_linear(block, name), PackedLiftLinear)
        if LAYER_TYPES[i] == "linear_attention":
            for name in FP_IN_LINEAR_BLOCK:
                assert not isinstance(block.get_submodule(name), PackedLiftLinear)
    state = model.state_dict()
    for key, value in fp.items():
        if not any(key.startswith(p + ".") for p in packed):
            assert torch.equal(state[key], value), key
    assert all(r["holdout_corrected"] < r["holdout_rounded"] for r in rows)


def test_text_model_save_load_logits_ppl_bits(quantized_text, tmp_path, tiny_lattice_dir):
    model, _, _, ids = quantized_text
    loaded = _save_load(model, tmp_path, tiny_lattice_dir, get_adapter(model.config))
    assert type(loaded).__name__ == "Qwen3_5ForCausalLM"
    with torch.no_grad():
        assert torch.equal(loaded(ids[:2]).logits, model(ids[:2]).logits)
        hf = _from_pretrained("AutoModelForCausalLM", tmp_path / "ckpt", "eager")
        assert torch.equal(hf(ids[:2]).logits, model(ids[:2]).logits)
    ppl = perplexity(loaded, ids.reshape(1, -1), seq_len=32, progress=False)
    assert torch.isfinite(torch.tensor(ppl))
    bits = bits_report(loaded)
    fp_small = sum(loaded.get_submodule(f"model.layers.{i}.{n}").weight.numel() * 32
                   for i, t in enumerate(LAYER_TYPES) if t == "linear_attention"
                   for n in FP_IN_LINEAR_BLOCK)
    assert bits["other_bits"] > fp_small  # in_proj_b/a, conv1d, norms, A_log, dt_bias
    assert bits["quantized_linears"]["bpw_codes"] == pytest.approx(2.0)
    out = loaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_vision_language_model_keeps_vision_tower(tiny_lattice_dir, tmp_path):
    model = tiny_qwen3_5(vision=True, num_hidden_layers=2, layer_types=LAYER_TYPES[:2])
    adapter = get_adapter(model.config)
    assert adapter.model_types == ("qwen3_5",)
    visual = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    _, ids = _quantize(model, tiny_lattice_dir)
    names = packed_module_names(model)
    assert len(names) == len(LINEAR_BLOCK) + len(FULL_BLOCK)
    assert all(n.startswith("model.language_model.layers.") for n in names)
    loaded = _save_load(model, tmp_path, tiny_lattice_dir, adapter)
    assert type(loaded).__name__ == "Qwen3_5ForConditionalGeneration"
    for key, value in loaded.model.visual.state_dict().items():
        assert value.dtype == visual[key].dtype and torch.equal(value, visual[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(ids[:2]).logits, model(ids[:2]).logits)
        hf = _from_pretrained("Qwen3_5ForConditionalGeneration", tmp_path / "ckpt", "sdpa")
        assert torch.equal(hf(ids[:2]).logits, model(ids[:2]).logits)
        for key, value in hf.model.visual.state_dict().items():
            assert torch.equal(value, visual[key]), key


def test_chat_hf_engine_matches_generate(quantized_text, tmp_path, tiny_lattice_dir):
    """chat.py's HF engine (transformers' StaticCache, which holds the linear-attention conv
    and recurrent states too) decodes a quantized Qwen3.5 like ``generate``; the step engine is
    Llama-like only and is refused for this family."""
    import io

    from conftest import make_tokenizer

    from liftquant.apps.chat import ChatSession, load_chat_model, parse_args

    model, _, _, _ = quantized_text
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> "
                         "{% endfor %}{% if add_generation_prompt %}assistant {% endif %}")
    qc = quantization_config(spec=SPEC, M=load_projection(SPEC, tiny_lattice_dir),
                             quantized_modules=packed_module_names(model),
                             not_converted=["lm_head"])
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
    assert got == [t for t in ref.tolist() if t != 2][:len(got)]
    args_step, _ = parse_args(["--quant_model_path", str(ckpt), "--device", "cpu",
                               "--engine", "step"])
    with pytest.raises(ValueError, match="engine hf"):
        ChatSession(qmodel, qtok, args_step, device, out=io.StringIO())


def test_gptq_baseline_runs_and_liftquant_beats_rtn(quantized_text):
    """The baselines replay each block with its own kwargs too; at 2 bits/weight (codes) the
    LiftQuant model is closer to FP than per-channel RTN on the final logits."""
    from liftquant.quantize import baselines as B

    model, _, _, ids = quantized_text
    ref = tiny_qwen3_5(attn="eager")
    with torch.no_grad():
        want = ref(ids[:4]).logits

    def rel(m):
        with torch.no_grad():
            return float((m(ids[:4]).logits - want).square().mean() / want.square().mean())

    errs = {}
    for method in ("rtn", "gptq"):
        base = tiny_qwen3_5(attn="eager")
        weights, rows = B.quantize_baseline(base, ids, spec=B.BaselineSpec(method, bits=2,
                                                                           group_size=0),
                                            adapter=get_adapter(base.config),
                                            device=torch.device("cpu"), batch_size=2)
        assert len(weights) == len(packed_module_names(model)) and len(rows) == 4
        errs[method] = rel(base)
    assert rel(model) < errs["rtn"], (rel(model), errs)
