"""Adapters, block-input capture + block replay, and full-precision model loading."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from liftquant.models import (
    ModelAdapter,
    get_adapter,
    load_fp_model,
    register_adapter,
    set_module,
    supported_model_types,
    tiny_llama,
    tiny_qwen2,
    tiny_qwen3,
)
from liftquant.quantize.cache import ActivationCache
from liftquant.quantize.capture import capture_block_inputs, run_block

N_SAMPLES, SEQ_LEN = 3, 12
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny matmuls run ~1000x slower with 2 threads on a busy 2-core host (thread wake-ups)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (N_SAMPLES, SEQ_LEN), generator=gen)


# ------------------------------------------------------------------------------ adapters
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_adapter_lookup_from_config(model_type: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    adapter = get_adapter(config)
    assert model_type in adapter.model_types
    assert model_type in supported_model_types()
    assert adapter.norm_fusion_map == {"input_layernorm": 0, "post_attention_layernorm": 2}
    assert adapter.fuse_norms == (model_type != "qwen3")


def test_unknown_type_lists_supported_and_override() -> None:
    with pytest.raises(ValueError) as err:
        get_adapter(SimpleNamespace(model_type="gpt2"))
    message = str(err.value)
    assert "--adapter" in message
    assert all(t in message for t in ("llama", "mistral", "qwen2", "qwen3", "qwen3_5",
                                      "qwen3_5_text"))
    assert get_adapter(SimpleNamespace(model_type="gpt2"), override="llama").model_types == (
        "llama",
    )
    assert get_adapter("qwen2") is get_adapter(SimpleNamespace(model_type="qwen2"))
    with pytest.raises(ValueError, match="not a registered adapter"):
        get_adapter("llama", override="nope")


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_qwen3])
def test_block_groups_resolve_to_linears(factory) -> None:
    model = factory()
    adapter = get_adapter(model.config)
    blocks = adapter.get_blocks(model)
    assert len(blocks) == 2
    for block in blocks:
        groups = adapter.block_groups(block)
        assert len(groups) == 4
        assert groups[0] == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        for name in adapter.linear_names(block):
            assert isinstance(adapter.get_linear(block, name), nn.Linear)
        pairs = dict(adapter.fusion_pairs(block))
        if adapter.fuse_norms:
            assert pairs == {"input_layernorm": groups[0], "post_attention_layernorm": groups[2]}
        else:
            assert pairs == {}
        has_bias = block.self_attn.q_proj.bias is not None
        assert has_bias == (model.config.model_type == "qwen2")
    for name in (adapter.final_norm, adapter.lm_head, adapter.embed, *adapter.pre_block):
        adapter.get_module(model, name)


def test_alt_groups_and_errors() -> None:
    block = nn.Module()
    block.attn = nn.Module()
    block.attn.in_proj = nn.Linear(4, 12)
    block.attn.out_proj = nn.Linear(4, 4)
    block.norm = nn.LayerNorm(4)
    adapter = ModelAdapter(
        model_types=("toy_hybrid",),
        groups=(("self_attn.q_proj",), ("self_attn.o_proj",)),
        alt_groups=((("attn.in_proj",), ("attn.out_proj",)),),
    )
    assert adapter.block_groups(block) == (("attn.in_proj",), ("attn.out_proj",))
    fused = ModelAdapter(
        model_types=("toy_fused",), groups=(("attn.in_proj",),), norm_fusion={"norm": 0}
    )
    assert fused.norm_fusion == (("norm", 0),) and hash(fused)
    assert fused.fusion_pairs(block) == (("norm", ("attn.in_proj",)),)
    with pytest.raises(ValueError, match="fuses into group"):
        ModelAdapter(model_types=("toy_bad_norm",), groups=(("a",),), norm_fusion={"n": 1})
    bad = ModelAdapter(model_types=("toy_bad",), groups=(("norm",),))
    with pytest.raises(TypeError, match="expected nn.Linear"):
        bad.block_groups(block)
    missing = ModelAdapter(model_types=("toy_missing",), groups=(("attn.nope",),))
    with pytest.raises(ValueError, match="attn.nope"):
        missing.block_groups(block)
    with pytest.raises(ValueError, match="appears twice"):
        ModelAdapter(model_types=("dup",), groups=(("a", "a"),))
    with pytest.raises(ValueError, match="already registered"):
        register_adapter(ModelAdapter(model_types=("llama",), groups=(("x",),)))


def test_set_module_replaces_by_dotted_path() -> None:
    model = tiny_llama()
    new = nn.Linear(64, 64, bias=False)
    old = set_module(model, "model.layers.1.self_attn.q_proj", new)
    assert isinstance(old, nn.Linear) and model.model.layers[1].self_attn.q_proj is new
    block = nn.Identity()
    set_module(model, "model.layers.0", block)
    assert model.model.layers[0] is block


# ------------------------------------------------------------------------ capture/replay
def _replay_logits(model, adapter, hidden: torch.Tensor, block_kwargs: dict, batch: int):
    """Run every block with run_block, then final norm + lm_head, ``batch`` samples at a time."""
    outs = []
    for start in range(0, hidden.shape[0], batch):
        x = hidden[start : start + batch]
        for block in adapter.get_blocks(model):
            x = run_block(block, x, block_kwargs)
        x = adapter.get_module(model, adapter.final_norm)(x)
        outs.append(adapter.get_module(model, adapter.lm_head)(x))
    return torch.cat(outs)


@pytest.mark.parametrize(
    ("factory", "overrides"),
    [
        (tiny_llama, {}),
        (tiny_qwen2, {}),
        (tiny_qwen3, {}),
        (tiny_llama, {"attn_implementation": "eager"}),
    ],
    ids=["llama", "qwen2", "qwen3", "llama-eager"],
)
@pytest.mark.parametrize("batch_size", [1, 2])
def test_capture_and_replay_reproduce_logits(factory, overrides, batch_size, input_ids) -> None:
    model = factory(**overrides)
    adapter = get_adapter(model.config)
    with torch.no_grad():
        reference = model(input_ids=input_ids).logits
        embeddings = model.model.embed_tokens(input_ids)
    cache = ActivationCache(N_SAMPLES, SEQ_LEN, model.config.hidden_size, dtype=torch.float32)
    block_kwargs = capture_block_inputs(
        model, adapter, input_ids, cache=cache, batch_size=batch_size, device="cpu"
    )
    assert torch.equal(cache[:], embeddings)
    assert "position_embeddings" in block_kwargs
    assert not {"past_key_values", "use_cache", "hidden_states"} & set(block_kwargs)
    with torch.no_grad():
        for replay_batch in sorted({batch_size, N_SAMPLES}):  # also a batch size != capture's
            logits = _replay_logits(model, adapter, cache[:], block_kwargs, replay_batch)
            torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
    assert all(p.device.type == "cpu" for p in model.parameters())


#: rope_scaling exactly as a Llama-3.1/3.2/3.3 config.json writes it (original context shrunk
#: to 64 so that the tiny model's positions straddle the scaled band).
LLAMA3_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64, "rope_type": "llama3"}


def test_llama3_rope_scaling_uses_llama_adapter(input_ids) -> None:
    """Llama-3.x (model_type "llama", rope_scaling "llama3") needs nothing but the llama
    adapter: the scaled rotary tables reach every block through position_embeddings."""
    from transformers import LlamaConfig

    legacy = LlamaConfig.from_dict({"rope_scaling": LLAMA3_ROPE_SCALING, "rope_theta": 500000.0,
                                    "max_position_embeddings": 512})
    model = tiny_llama(rope_parameters=legacy.rope_parameters, max_position_embeddings=512)
    plain = tiny_llama(rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                       max_position_embeddings=512)
    assert model.model.rotary_emb.rope_type == "llama3"
    assert not torch.equal(model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)
    adapter = get_adapter(model.config)
    assert adapter is get_adapter("llama")
    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(3))
    cache = ActivationCache(2, 96, model.config.hidden_size, dtype=torch.float32)
    kwargs = capture_block_inputs(model, adapter, ids, cache=cache, batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(_replay_logits(model, adapter, cache[:], kwargs, 2),
                                   model(ids).logits, atol=ATOL, rtol=0)


def test_capture_bf16_cache_and_grad_through_run_block(input_ids) -> None:
    model = tiny_llama()
    adapter = get_adapter(model.config)
    cache = ActivationCache(N_SAMPLES, SEQ_LEN, 64, dtype=torch.bfloat16)
    kwargs = capture_block_inputs(model, adapter, input_ids, cache=cache, batch_size=2)
    block = adapter.get_blocks(model)[0]
    x = cache.get_batch([0, 2]).float()
    out = run_block(block, x, kwargs, device="cpu")
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    assert block.self_attn.q_proj.weight.grad is not None
    block_bf16 = adapter.get_blocks(tiny_llama().to(torch.bfloat16))[0]
    with torch.no_grad():  # float32 kwargs are cast to the bf16 activations
        assert run_block(block_bf16, cache.get_batch([1]), kwargs).dtype == torch.bfloat16


def test_capture_rejects_shape_mismatch(input_ids) -> None:
    model = tiny_llama()
    cache = ActivationCache(N_SAMPLES + 1, SEQ_LEN, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="do not match"):
        capture_block_inputs(model, get_adapter(model.config), input_ids, cache=cache)


# ------------------------------------------------------------------------------- loading
def test_load_fp_model_from_saved_folder(tmp_path, input_ids) -> None:
    model = tiny_qwen2(seed=3)
    model.save_pretrained(tmp_path)
    loaded, tokenizer = load_fp_model(str(tmp_path), dtype=torch.float32)
    assert tokenizer is None
    assert type(loaded).__name__ == "Qwen2ForCausalLM" and not loaded.training
    assert loaded.config.use_cache is False
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits)
    loaded_bf16, _ = load_fp_model(str(tmp_path))
    assert next(loaded_bf16.parameters()).dtype == torch.bfloat16


def test_load_fp_model_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_fp_model(str(tmp_path / "missing_model"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_fp_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_fp_model(str(tmp_path))
    from transformers import GPT2Config

    GPT2Config(n_layer=1).save_pretrained(tmp_path / "gpt2")  # config only: no weights to read
    with pytest.raises(ValueError, match="--adapter"):
        load_fp_model(str(tmp_path / "gpt2"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="local"):
        load_fp_model("nonexistent-org/nonexistent-model")


def test_resolve_gguf_path_splits_folder_and_file(tmp_path) -> None:
    from liftquant.models import resolve_source

    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)) == (str(tmp_path.resolve()), "model.Q4_1.gguf", True)
    assert resolve_source(str(tmp_path), "model.Q4_1.gguf")[1] == "model.Q4_1.gguf"
    assert resolve_source("org/name") == ("org/name", None, False)


# ---------------------------------------------------------------------------------- GGUF
def _permute_for_gguf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (rotary halves interleaved per head); transformers undoes it."""
    out, *rest = weight.shape
    return weight.reshape(heads, 2, out // heads // 2, *rest).transpose(1, 2).reshape(weight.shape)


def _write_tiny_llama_gguf(model, path) -> None:
    """An F32 llama GGUF of ``model`` with a 256-token byte-level BPE vocabulary."""
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cfg, spell = model.config, bytes_to_unicode()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    # 254 bytes + " t" + " a"; two merges, since older readers unwrap one-element arrays
    merged = [(spell[32], spell[ord("t")]), (spell[32], spell[ord("a")])]
    writer.add_token_list([spell[b] for b in range(254)] + [a + b for a, b in merged])
    writer.add_token_types([1] * 256)
    writer.add_token_merges([f"{a} {b}" for a, b in merged])
    gguf_names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for key, value in model.state_dict().items():
        if key not in top:
            layer, module = key.split(".")[2], ".".join(key.split(".")[3:-1])
            heads = {
                "self_attn.q_proj": cfg.num_attention_heads,
                "self_attn.k_proj": cfg.num_key_value_heads,
            }.get(module)
            value = _permute_for_gguf(value, heads) if heads else value
        name = top.get(key) or f"blk.{layer}.{gguf_names[module]}.weight"
        writer.add_tensor(name, value.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_load_fp_model_from_gguf_file(tmp_path, input_ids) -> None:
    model = tiny_llama(seed=1)
    path = tmp_path / "tiny.F32.gguf"
    _write_tiny_llama_gguf(model, path)
    loaded, tokenizer = load_fp_model(str(path), dtype=torch.float32)
    assert getattr(loaded, "hf_quantizer", None) is None and not loaded.is_quantized
    assert getattr(loaded.config, "quantization_config", None) is None
    assert loaded.config.use_cache is False and not loaded.training
    assert tokenizer is not None and tokenizer("hi").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_capture_on_accelerator_keeps_blocks_on_cpu(input_ids) -> None:
    model = tiny_llama()
    adapter = get_adapter(model.config)
    with torch.no_grad():
        reference = model(input_ids=input_ids).logits
    cache = ActivationCache(N_SAMPLES, SEQ_LEN, 64, dtype=torch.float32, mode="pinned")
    kwargs = capture_block_inputs(
        model, adapter, input_ids, cache=cache, batch_size=2, device="cuda"
    )
    assert all(p.device.type == "cpu" for p in model.parameters())
    model.to("cuda")
    with torch.no_grad():
        logits = _replay_logits(
            model, adapter, cache.get_batch(slice(0, N_SAMPLES), "cuda"), kwargs, batch=2
        )
    torch.testing.assert_close(logits.cpu(), reference, atol=1e-4, rtol=1e-4)
