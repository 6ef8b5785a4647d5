"""chat/chat_bitblas_compile.py and liftquant.chat on CPU with a tiny packed checkpoint."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer

from liftquant.cli.config import CalibArgs, LatticeArgs, RunConfig, TrainArgs
from liftquant.core.lattice import LatticeSpec, load_projection
from liftquant.io.checkpoint import packed_module_names, quantization_config, save_quantized
from liftquant.models import get_adapter, tiny_llama
from liftquant.quantize.calibrate import quantize_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "chat" / "chat_bitblas_compile.py"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")


def build_chat_checkpoint(out_dir: Path, lattice_dir: Path) -> Path:
    """Quantize the tiny Llama (one short epoch) and save it with a chat-template tokenizer."""
    spec = LatticeSpec.parse("8to4")
    M = load_projection(spec, lattice_dir)
    cfg = RunConfig(calib=CalibArgs(nsamples=4, seqlen=16, batch_size=2, seed=0),
                    lattice=LatticeArgs(expc="8to4"), train=TrainArgs(epochs=1, holdout=1))
    model = tiny_llama(seed=0)
    ids = torch.randint(0, model.config.vocab_size, (4, 16),
                        generator=torch.Generator().manual_seed(1))
    quantize_model(model, ids, cfg=cfg, M=M, spec=spec, adapter=get_adapter(model.config),
                   device=torch.device("cpu"))
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    qc = quantization_config(spec=spec, M=M, quantized_modules=packed_module_names(model),
                             not_converted=["lm_head"])
    return save_quantized(model, tok, out_dir, qconfig=qc)


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory, tiny_lattice_dir):
    return build_chat_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", tiny_lattice_dir)


def _session(ckpt, *extra):
    from liftquant.apps.chat import ChatSession, load_chat_model, parse_args

    args, _ = parse_args(["--quant_model_path", str(ckpt), "--device", "cpu",
                          "--backend", "torch", "--max_cache_len", "128", *extra])
    model, tok, device = load_chat_model(args)
    out = io.StringIO()
    return ChatSession(model, tok, args, device, out=out), out


def test_script_answers_two_prompts_on_cpu(chat_ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--quant_model_path", str(chat_ckpt), "--device", "cpu",
         "--backend", "torch", "--max_new_tokens", "6", "--prompt", "the quick fox",
         "--prompt", "a lazy dog"], check=False, capture_output=True, text=True, env=env,
        timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("user: ") == 2 and res.stdout.count("assistant: ") == 2
    assert res.stdout.count("tok/s") == 4  # prefill and decode, after each answer
    assert "prefill" in res.stdout and "decode" in res.stdout


def test_two_turns_keep_history_and_greedy_matches_generate(chat_ckpt):
    session, out = _session(chat_ckpt, "--max_new_tokens", "5")
    session.ask("the quick fox")
    first_ids = list(session.last_token_ids)
    # greedy decoding through the static cache == transformers' generate
    prompt = session.tok("user the quick fox </s> assistant", return_tensors="pt").input_ids
    ref = session.model.generate(prompt, attention_mask=torch.ones_like(prompt),  # <unk> == 0
                                 max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=2)[0, prompt.shape[1]:].tolist()
    assert first_ids == [t for t in ref if t != 2][:len(first_ids)]
    session.ask("a lazy dog")
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    first_answer = session.history[1]["content"]
    text = session.tok.apply_chat_template(session.history, tokenize=False,
                                           add_generation_prompt=True)
    assert text.startswith(f"user the quick fox </s> assistant {first_answer} </s> "
                           "user a lazy dog </s> assistant")
    assert len(session.stats) == 2 and session.stats[1]["prefill_tokens"] > \
        session.stats[0]["prefill_tokens"]
    assert out.getvalue().count("tok/s") == 4


def test_sampling_options_and_seed(chat_ckpt):
    flags = ("--do_sample", "--temperature", "1.5", "--top_p", "0.8", "--top_k", "10",
             "--max_new_tokens", "6", "--seed", "3")
    a, _ = _session(chat_ckpt, *flags)
    b, _ = _session(chat_ckpt, *flags)
    assert a.ask("the fox") == b.ask("the fox")
    assert a.stats[0]["decode_tokens"] <= 5


def test_fp_model_path_gives_only_the_tokenizer(chat_ckpt, tiny_model_dir):
    session, _ = _session(chat_ckpt, "--fp_model_path", str(tiny_model_dir),
                          "--max_new_tokens", "3")
    assert not session.tok.chat_template  # tiny_model_dir's tokenizer has none: plain transcript
    session.ask("the fox")
    assert session.stats[0]["decode_tokens"] <= 2


def test_missing_or_bad_checkpoint_is_a_clear_error(tmp_path, tiny_model_dir):
    from liftquant.apps.chat import main

    with pytest.raises(SystemExit, match="does not exist"):
        main(["--quant_model_path", str(tmp_path / "nowhere"), "--prompt", "hi"])
    with pytest.raises(SystemExit, match="required"):
        main(["--prompt", "hi"])
    with pytest.raises(ValueError, match="not a LiftQuant checkpoint"):
        main(["--quant_model_path", str(tiny_model_dir), "--prompt", "hi", "--device", "cpu"])


def test_warm_up_runs_one_eager_decode_step_before_the_compiled_one(chat_ckpt):
    """The compiled (CUDA-graph) step must never be the first batch-1 call of the packed
    layers: their GEMV tuning and split-K workspaces are set up by an eager step first."""
    session, _ = _session(chat_ckpt, "--engine", "hf")
    engine = session.loop
    calls = []
    eager = engine._decode_step

    def eager_step(ids, pos):
        calls.append("eager")
        return eager(ids, pos)

    def compiled_step(ids, pos):
        assert calls and calls[0] == "eager", "compiled decode ran before any eager step"
        calls.append("compiled")
        return eager(ids, pos)

    engine._decode_step, engine.decode = eager_step, compiled_step
    assert session.warm_up(prompt_len=4, steps=3) >= 0
    assert calls == ["eager"] + ["compiled"] * 3
    assert int(engine.cache.get_seq_length()) == 0 and engine.position == 0  # reset


def test_step_engine_matches_hf_engine_greedy(chat_ckpt):
    """--engine step (liftquant.engine.step, batched prefill) answers exactly like the
    HF-forward engine under greedy decoding, over two turns, after its warm-up."""
    hf, _ = _session(chat_ckpt, "--max_new_tokens", "6", "--engine", "hf")
    st, out = _session(chat_ckpt, "--max_new_tokens", "6", "--engine", "step")
    assert (hf.engine, st.engine) == ("hf", "step")
    assert st.warm_up(prompt_len=5, steps=2) >= 0 and int(st.loop.step.pos) == 0
    for prompt in ("the quick fox", "a lazy dog"):
        assert st.ask(prompt) == hf.ask(prompt)
        assert st.last_token_ids == hf.last_token_ids and st.last_token_ids
    assert out.getvalue().count("tok/s") == 4


def test_engine_auto_and_unsupported_architecture(chat_ckpt, monkeypatch):
    s, _ = _session(chat_ckpt)
    assert s.engine == "hf"  # auto on CPU: the HF forward
    from liftquant.apps.chat import ChatSession, load_chat_model, parse_args

    args, _ = parse_args(["--quant_model_path", str(chat_ckpt), "--device", "cpu",
                          "--backend", "torch", "--engine", "step"])
    model, tok, device = load_chat_model(args)
    monkeypatch.setattr(model.config, "model_type", "gpt2")
    with pytest.raises(ValueError, match="--engine hf"):
        ChatSession(model, tok, args, device)


def test_auto_engine_falls_back_to_hf_when_the_step_engine_fails(chat_ckpt, monkeypatch):
    """--engine auto: a step engine that cannot run (e.g. a CUDA-graph capture error) is
    replaced by the HF engine in the warm-up, with a warning; an explicit --engine step
    re-raises instead."""
    from liftquant.engine import StepEngine

    def broken(self, token):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(StepEngine, "next", broken)
    auto, _ = _session(chat_ckpt, "--max_new_tokens", "4")
    auto.loop = StepEngine(auto.model, 64)  # what auto picks on CUDA
    auto.warm_up(prompt_len=4, steps=1)
    assert auto.engine == "hf" and auto.ask("the fox")
    forced, _ = _session(chat_ckpt, "--engine", "step")
    with pytest.raises(RuntimeError, match="capture failed"):
        forced.warm_up(prompt_len=4, steps=1)


def test_host_embed_keeps_the_table_on_the_host_and_answers_the_same(chat_ckpt):
    """--host_embed: the checkpoint loads with the embedding table in host memory, the step
    engine is chosen (no HF fallback) and greedy answers equal the HF engine's; asking for
    the HF engine with it is refused with the fix."""
    from liftquant.io.checkpoint import CheckpointError, load_quantized

    hf, _ = _session(chat_ckpt, "--max_new_tokens", "6", "--engine", "hf")
    st, _ = _session(chat_ckpt, "--max_new_tokens", "6", "--host_embed")
    assert st.engine == "step" and not st.engine_fallback
    assert st.loop.step.host_table is not None
    for prompt in ("the quick fox", "a lazy dog"):
        assert st.ask(prompt) == hf.ask(prompt)
    with pytest.raises(ValueError, match="host_embed needs the step engine"):
        _session(chat_ckpt, "--host_embed", "--engine", "hf")
    model, _ = load_quantized(chat_ckpt, device="meta", backend="torch", host_embed=True)
    assert model.get_input_embeddings().weight.device.type == "cpu"
    assert all(p.device.type == "meta" for n, p in model.named_parameters()
               if "embed_tokens" not in n)
    tied = chat_ckpt.parent / "tied"
    if not tied.exists():
        import shutil

        shutil.copytree(chat_ckpt, tied)
        import json

        cfg = json.loads((tied / "config.json").read_text())
        cfg["tie_word_embeddings"] = True
        (tied / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shares the embedding table"):
        load_quantized(tied, device="cpu", backend="torch", host_embed=True, verify=False)
