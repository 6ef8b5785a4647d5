"""Streaming multi-turn chat with a LiftQuant checkpoint (``chat/chat_bitblas_compile.py``).

One answer = one *prefill* (the whole conversation, rendered with the tokenizer's chat template)
followed by a manual *decode* loop of one token per step, streamed to stdout. The KV cache is a
transformers ``StaticCache`` allocated once (``--max_cache_len``), so on CUDA the decode step has
fixed shapes and addresses and ``torch.compile(mode="reduce-overhead")`` captures it as a CUDA
graph (``--compile``, on by default on CUDA; the first answer pays the compilation). After each
answer the prefill and decode throughput is printed::

    [prefill <n> tok <rate> tok/s | decode <n> tok <rate> tok/s | <seconds> s]

Checkpoints are self-contained (config, packed weights, tokenizer), so ``--fp_model_path`` is not
needed; if given, only the tokenizer is read from it.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from liftquant.cli.config import DeviceArgs, KernelArgs, _f, add_dataclass_args
from liftquant.util.log import get_logger

logger = get_logger("chat")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class ChatArgs(DeviceArgs, KernelArgs):
    """The chat flags; ``--device`` and ``--backend`` are the shared groups of
    :mod:`liftquant.cli.config` (one definition with ``main.py``, ``e2efinetune.py`` and
    ``scripts/eval.py``)."""

    quant_model_path: str = _f("", "required: LiftQuant checkpoint folder (main.py "
                                "--save_dir)")
    fp_model_path: str | None = _f(None, "optional and not needed (checkpoints are "
                                   "self-contained); if given, only its tokenizer is used")
    dtype: str = _f("auto", "activation dtype (auto: the checkpoint's)",
                    choices=("auto", "float16", "bfloat16", "float32"))
    max_new_tokens: int = _f(256, "tokens generated per answer at most")
    max_cache_len: int = _f(4096, "static KV cache length (conversation + answer); the oldest "
                            "turns are dropped when a conversation outgrows it")
    do_sample: bool = _f(False, "sample (with --temperature/--top_p/--top_k); default greedy")
    temperature: float = _f(0.7, "sampling temperature (with --do_sample)")
    top_p: float = _f(0.9, "nucleus sampling mass (with --do_sample; 1 disables)")
    top_k: int = _f(50, "sample among the k most likely tokens (with --do_sample; 0 disables)")
    seed: int = _f(0, "sampling seed")
    compile: bool | None = _f(None, "torch.compile the decode step with CUDA graphs "
                              "(default: on for CUDA, off on CPU)")
    engine: str = _f("auto", "generation loop (liftquant.engine): 'step' = own decode step "
                     "(static KV cache, batched prefill, one CUDA graph per token on CUDA; "
                     "Llama-layout families), 'hf' = the model's forward with a StaticCache and "
                     "torch.compile (any architecture); auto: step on CUDA where it applies",
                     choices=("auto", "step", "hf"))
    dense_cache: str = _f("env", "CPU: keep the decoded dense weights in RAM (one matmul per "
                          "layer): 1 always, 0 never, auto when they fit the memory budget; env: "
                          "as LIFTQUANT_DENSE_CACHE says (default auto)",
                          choices=("env", "auto", "0", "1"))
    host_embed: bool = _f(False, "keep the token embedding table in host memory, never on the "
                          "GPU (step engine; saves its bytes, e.g. 2.1 GB for a Llama-3-70B; "
                          "not for checkpoints whose head shares the table)")
    system: str | None = _f(None, "system prompt")
    warmup: bool = _f(True, "one throw-away prefill + decode steps before the first question, so "
                      "compilation, CUDA-graph capture and kernel tuning are not counted in the "
                      "first answer's tokens/s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_dataclass_args(p, ChatArgs, group="chat")
    p.add_argument("--prompt", action="append", default=None,
                   help="non-interactive: answer this prompt and exit; repeat for several turns")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[ChatArgs, list[str] | None]:
    ns = vars(build_parser().parse_args(argv))
    prompts = ns.pop("prompt")
    args = ChatArgs(**{k: v for k, v in ns.items() if v is not None})
    if not args.quant_model_path:
        raise SystemExit("error: --quant_model_path is required (a LiftQuant checkpoint folder)")
    return args, prompts


def load_chat_model(args: ChatArgs) -> tuple[Any, Any, torch.device]:
    from transformers import AutoTokenizer

    from liftquant.apps.api import resolve_device
    from liftquant.io.checkpoint import CheckpointError, load_quantized, read_quantization_config

    path = Path(args.quant_model_path)
    if not path.is_dir():
        raise SystemExit(f"error: --quant_model_path {path} does not exist or is not a folder; "
                         "pass the --save_dir of a `python main.py` run")
    read_quantization_config(path)  # clear errors for folders that are not LiftQuant checkpoints
    device = resolve_device(args.device)
    dtype = None if args.dtype == "auto" else _DTYPES[args.dtype]
    try:
        model, tok = load_quantized(path, device=device, dtype=dtype, backend=args.backend,
                                    host_embed=args.host_embed)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    if dtype is not None:  # load_quantized keeps stored dtypes; cast the dense parameters
        for p in model.parameters():  # (packed layers hold buffers only: their side tensors
            p.data = p.data.to(dtype)  # stay in the checkpoint's fp16)
    if args.fp_model_path:
        tok = AutoTokenizer.from_pretrained(args.fp_model_path)
    if device.type == "cuda":
        from liftquant.io.checkpoint import WEIGHTS_NAME
        from liftquant.util.log import peak_memory_gib

        logger.info("loaded %s: peak GPU memory %.2f GiB, checkpoint %.2f GiB", path,
                    peak_memory_gib(device), (path / WEIGHTS_NAME).stat().st_size / 2**30)
    if tok is None:
        raise SystemExit(f"error: {path} holds no tokenizer; pass --fp_model_path to read one")
    return model, tok, device


class ChatSession:
    """Conversation history + generation loop for one model, over a ``liftquant.engine``
    engine (``--engine``): ``hf`` runs the model's own forward over a transformers
    ``StaticCache`` (the decode step under ``torch.compile`` with CUDA graphs); ``step`` runs
    :class:`liftquant.engine.DecodeStep` (the loop of ``scripts/bench_decode.py``: own KV cache,
    compiled non-linear regions, the whole step captured as one CUDA graph on CUDA). Both
    prefill the prompt in one batched pass. On the CPU the dense weight cache is used when it
    fits (``--dense_cache``, logged).
    """

    def __init__(self, model: Any, tokenizer: Any, args: ChatArgs, device: torch.device,
                 out: TextIO = sys.stdout) -> None:
        from liftquant.engine import build_engine, prepare_model, step_supported
        from liftquant.kernels.policy import default_policy

        self.model, self.tok, self.args, self.device, self.out = model, tokenizer, args, device, out
        self.history: list[dict[str, str]] = []
        self.generator = torch.Generator(device="cpu").manual_seed(args.seed)
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.use_compile = args.compile if args.compile is not None else device.type == "cuda"
        policy = default_policy()
        if args.dense_cache != "env":
            policy = policy.replace(dense_cache=args.dense_cache)
        self.dense = prepare_model(model, device=device, policy=policy)
        if args.engine == "step" and (why := step_supported(model)) is not None:
            raise ValueError(why)
        self.stats: list[dict[str, float]] = []
        # the HF engine cannot run a model whose embedding stays on the host
        self.engine_fallback = args.engine == "auto" and not args.host_embed
        self.loop = build_engine(model, args.engine, max_len=args.max_cache_len,
                                 compile=self.use_compile, device=device,
                                 host_embed=args.host_embed)

    @property
    def engine(self) -> str:
        """The engine's name: ``step`` or ``hf``."""
        return self.loop.name

    def _use_hf(self) -> None:
        from liftquant.engine import HFEngine

        self.loop = HFEngine(self.model, self.args.max_cache_len, compile=self.use_compile,
                             device=self.device)

    # ------------------------------------------------------------------ prompt
    def prompt_ids(self) -> Tensor:
        msgs = ([{"role": "system", "content": self.args.system}] if self.args.system else [])
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(msgs + self.history, tokenize=False,
                                                add_generation_prompt=True)
        else:  # no template: a plain transcript
            text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs + self.history)
            text += "assistant:"
        ids = self.tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        return ids.to(self.device)

    # ------------------------------------------------------------------ model steps
    def _prefill(self, ids: Tensor) -> Tensor:
        """Fresh context from ``ids`` (1, n); logits (1, V) after its last token."""
        return self.loop.prefill(ids)

    def _next(self, token: Tensor) -> Tensor:
        """Logits (1, V) after feeding ``token`` at the next position."""
        return self.loop.next(token)

    def _pick(self, logits: Tensor) -> Tensor:
        a = self.args
        if not a.do_sample or a.temperature <= 0:
            return logits.argmax(-1)
        logits = logits.float() / a.temperature
        if a.top_k > 0:
            kth = torch.topk(logits, min(a.top_k, logits.shape[-1])).values[..., -1, None]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if a.top_p < 1.0:
            sorted_logits, idx = torch.sort(logits, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > a.top_p  # keep the token crossing top_p
            logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1).cpu()
        return torch.multinomial(probs, 1, generator=self.generator)[..., 0].to(logits.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def warm_up(self, prompt_len: int = 16, steps: int = 4) -> float:
        """Run the prefill and decode paths once on dummy tokens; returns the seconds spent.
        With ``--engine auto`` a step engine that fails here is replaced by the HF engine."""
        try:
            return self.loop.warm_up(prompt_len, steps)
        except Exception as err:
            if self.loop.name != "step" or not self.engine_fallback:
                raise
            logger.warning("--engine step failed in the warm-up (%s: %s); using --engine hf",
                           type(err).__name__, str(err)[:300])
            self._use_hf()
            return self.loop.warm_up(prompt_len, steps)

    # ------------------------------------------------------------------ one turn
    @torch.inference_mode()
    def ask(self, text: str) -> str:
        self.history.append({"role": "user", "content": text})
        ids = self.prompt_ids()
        while ids.shape[1] + self.args.max_new_tokens > self.args.max_cache_len:
            if len(self.history) <= 1:
                raise ValueError(f"prompt of {ids.shape[1]} tokens + --max_new_tokens "
                                 f"{self.args.max_new_tokens} exceed --max_cache_len "
                                 f"{self.args.max_cache_len}")
            self.history = self.history[2:]  # drop the oldest exchange
            ids = self.prompt_ids()
        n = ids.shape[1]
        t0 = time.perf_counter()
        token = self._pick(self._prefill(ids))
        self._sync()
        t1 = time.perf_counter()
        generated: list[int] = []
        shown = ""
        for step in range(self.args.max_new_tokens):
            tid = int(token)
            if tid in self.eos:
                break
            generated.append(tid)
            text_now = self.tok.decode(generated, skip_special_tokens=True,
                                       clean_up_tokenization_spaces=False)
            if not text_now.endswith("\ufffd"):  # wait for complete UTF-8 characters
                self.out.write(text_now[len(shown):])
                self.out.flush()
                shown = text_now
            if step + 1 == self.args.max_new_tokens:
                break
            token = self._pick(self._next(token))
        self._sync()
        t2 = time.perf_counter()
        answer = self.tok.decode(generated, skip_special_tokens=True,
                                 clean_up_tokenization_spaces=False)
        self.out.write(answer[len(shown):] + "\n")
        n_dec = max(0, len(generated) - 1)  # decode steps run (the first token came from prefill)
        stats = {"prefill_tokens": n, "prefill_tok_s": n / max(t1 - t0, 1e-9),
                 "decode_tokens": n_dec, "decode_tok_s": n_dec / max(t2 - t1, 1e-9),
                 "seconds": t2 - t0}
        self.stats.append(stats)
        self.out.write(f"[prefill {n} tok {stats['prefill_tok_s']:.1f} tok/s | decode {n_dec} "
                       f"tok {stats['decode_tok_s']:.1f} tok/s | {stats['seconds']:.2f} s]\n")
        self.out.flush()
        self.history.append({"role": "assistant", "content": answer})
        self.last_token_ids = generated
        return answer


def main(argv: list[str] | None = None) -> int:
    from liftquant.util.log import setup_logging

    setup_logging()
    args, prompts = parse_args(argv)
    model, tok, device = load_chat_model(args)
    try:
        session = ChatSession(model, tok, args, device)
    except ValueError as err:  # engine refusals (--engine step/hf, --host_embed): one line
        raise SystemExit(f"error: {err}") from None
    if args.warmup:
        logger.info("warm-up (compilation, CUDA graphs, kernel tuning): %.1f s", session.warm_up())
    if prompts:
        for p in prompts:
            print(f"user: {p}\nassistant: ", end="", flush=True)
            session.ask(p)
        return 0
    print("LiftQuant chat: empty line or /exit quits, /reset clears the history.", flush=True)
    while True:
        try:
            text = input("user: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text in ("", "/exit", "/quit"):
            return 0
        if text == "/reset":
            session.history.clear()
            continue
        print("assistant: ", end="", flush=True)
        session.ask(text)
