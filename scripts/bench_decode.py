"""Greedy decode tokens/s, bf16 vs LiftQuant, batch 1 and more -> bench/decode/decode.csv.

* ``--models llama3-8b-shape,llama3-70b-shape``: ``LlamaConfig`` of Llama-3-8B's / 70B's shape
  with random weights (no checkpoint, no calibration): bf16 everywhere (8B only: a bf16 70B does
  not fit one H200 next to anything else), or with every decoder linear replaced by a
  ``PackedLiftLinear`` with random codes (``--lattices``; empty skips the packed runs).
* ``--checkpoint DIR`` (a LiftQuant checkpoint, ``liftquant.load_quantized``) against its bf16
  original ``--fp_model`` (a folder, or ``demo`` for SmolLM2-135M as converted in the liftquant
  cache); rows ``model=<name>``. If the original cannot be loaded (``demo`` never converted on
  this machine), a bf16 model of the same config with random weights stands in: decode speed
  depends on shapes only (backend ``cublas-random``).

Every model runs the same step (``liftquant.engine.step``) for each ``--batch`` (independent
sequences at the same positions): a 32-token prompt prefilled in one pass (the GEMM path),
warm-up, then one CUDA graph per step replayed for ``--tokens`` steps. With ``--compile``
(default) the non-linear regions are torch.compiled once per shape and shared by all layers and
models. ``--policy pdl=0,fused_small=1`` runs the packed models under that ``KernelPolicy``
(the process policy with those fields replaced; column ``policy``). ``roofline_tokens_per_s``
= batch x the measured copy bandwidth (read + write, as ``bench_kernels.copy_gbps``) over the
bytes of every weight a step reads (packed codes and side tensors, dense layers, the head);
``kv_gb`` is the static KV cache the step reads per step (it attends over the masked cache).
``python scripts/bench_decode.py --out bench/decode/decode.csv``
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from bench_kernels import fill_random_
from torch import nn

from liftquant.core.linear import PackedLiftLinear
from liftquant.engine.graph import GraphedDecode
from liftquant.engine.step import DecodeStep
from liftquant.kernels import registry
from liftquant.kernels.policy import KernelPolicy, default_policy
from liftquant.util.provenance import RECORD_KEY, record_fields
from liftquant.util.records import merge_csv_rows

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
COLUMNS = ["model", "config", "backend", "batch", "decode_tokens_per_s", "bf16_tokens_per_s",
           "speedup", "peak_mem_gb", "weight_gb", "kv_gb", "roofline_tokens_per_s",
           "fraction_of_roofline", "policy", "max_len", "compile", "gpu", "commit"]
# other commits' rows are kept
KEY = ("model", "config", "backend", "batch", "policy", "max_len", "compile", *RECORD_KEY)
PROMPT, WARMUP = 32, 8


def llama3_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False)


def llama3_70b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False)


SHAPE_MODELS = {"llama3-8b-shape": llama3_8b_config, "llama3-70b-shape": llama3_70b_config}
# bf16 baselines that fit one H200 with room for the packed model next to it
BF16_MODELS = ("llama3-8b-shape",)


def parse_policy(text: str) -> KernelPolicy:
    """'pdl=0,fused_small=1' -> the process policy with those fields replaced."""
    policy = default_policy()
    if not text:
        return policy
    fields = {f: type(getattr(policy, f)) for f in KernelPolicy.__dataclass_fields__}
    changes = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--policy: unknown field {key!r}; fields: {', '.join(fields)}")
        kind = fields[key]
        changes[key] = value in ("1", "true", "True") if kind is bool else kind(value)
    return policy.replace(**changes)


def head8(model: nn.Module, bits: int) -> nn.Module:
    """The model with its head in per-channel int8 when ``bits == 8``."""
    if bits == 8:
        from liftquant.kernels.int8_head import quantize_lm_head

        quantize_lm_head(model)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every tensor a decode step reads in full: parameters and buffers (shared ones
    once), less the embedding table unless the head shares it (one row is read)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and t.device.type != "meta":
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    emb = model.get_input_embeddings().weight
    head = getattr(model.get_output_embeddings(), "weight", None)  # None: the int8 head
    if head is None or emb.data_ptr() != head.data_ptr():
        total -= emb.numel() * emb.element_size()
    return total


@torch.no_grad()
def build_model(config, lattice: str | None, backend: str, device: str = "cuda",
                policy: KernelPolicy | None = None, host_embed: bool = False) -> nn.Module:
    """Meta skeleton -> (packed linears) -> device storage -> random init: peak = final size.
    ``host_embed``: the embedding table is made in host memory, never on ``device``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    for layer in model.model.layers if lattice else []:
        for name in LINEARS:
            parent_name, attr = name.rsplit(".", 1)
            parent = layer.get_submodule(parent_name)
            lin = getattr(parent, attr)
            setattr(parent, attr, PackedLiftLinear(lin.in_features, lin.out_features,
                                                   spec=lattice, bias=lin.bias is not None,
                                                   device="meta"))
    embed = model.get_input_embeddings()
    if host_embed:
        model.set_input_embeddings(None)  # to_empty below leaves it alone
    model.to_empty(device=device)
    if host_embed:
        model.set_input_embeddings(embed.to_empty(device="cpu"))
    model.tie_weights()  # to_empty unties shared parameters (SmolLM2's head)
    for p in model.parameters():
        p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    for i, m in enumerate(model.modules()):
        if isinstance(m, PackedLiftLinear):
            fill_random_(m, seed=i)
    rotary = type(model.model.rotary_emb)(config=config)  # fp32 inv_freq, computed on the CPU
    model.model.rotary_emb = rotary.to(device)
    registry.set_backend(model, backend, policy=policy)
    return model.eval()


def load_pair(checkpoint: str, fp_model: str, backend: str, policy: KernelPolicy | None = None):
    """(loader of the bf16 original, loader of the quantized model, lattice name)."""
    from liftquant.io.checkpoint import load_quantized, read_quantization_config

    lattice = read_quantization_config(Path(checkpoint))["lattice"]

    def quantized():
        model = load_quantized(checkpoint, device="cuda", dtype=torch.bfloat16,
                               backend=backend)[0]
        registry.set_backend(model, backend, policy=policy)
        return model

    def original():
        from liftquant.models.loading import load_fp_model

        source = fp_model
        try:
            if fp_model == "demo":  # only an already converted copy: fetching or converting
                from liftquant.demo.assets import DEFAULT_MODEL, cache_root  # takes minutes

                source = str(cache_root() / "hf" / DEFAULT_MODEL)  # assets.hf_model_dir's folder
            return load_fp_model(source, dtype=torch.bfloat16)[0].to("cuda"), "cublas"
        except Exception as err:  # noqa: BLE001 - offline GPU machines: same shapes, random
            warnings.warn(f"bf16 original {fp_model!r} not loadable ({err}); timing a random "
                          "model of the checkpoint's config instead", RuntimeWarning,
                          stacklevel=2)
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(checkpoint)
            vars(config).pop("quantization_config", None)  # a plain bf16 model
            return build_model(config, None, "torch"), "cublas-random"

    return original, quantized, lattice


def max_len(tokens: int) -> int:
    """Static cache length for timing ``tokens``: the prompt, the warm-up, the capture and the
    replays. The step attends over the whole (masked) cache, so runs compared with each other
    must share it."""
    return PROMPT + WARMUP + 1 + tokens + tokens // 4 + 8


def measure(model: nn.Module, *, tokens: int, compile_mode: str | None, batch: int = 1,
            cache_len: int | None = None, host_embed: bool = False
            ) -> tuple[float, float, float]:
    """Decode tokens/s (all sequences), peak GPU memory (GB) while decoding, and the KV cache
    bytes (GB) a step reads."""
    step = DecodeStep(model, cache_len or max_len(tokens), compile_mode=compile_mode,
                      batch=batch, host_embed=host_embed)
    step.prefill(torch.randint(0, model.config.vocab_size, (batch, PROMPT), device="cuda"))
    torch.cuda.reset_peak_memory_stats()  # kernel tuning's L2-flush buffer is not decode memory
    graphed = GraphedDecode(step, warmup=WARMUP)
    graphed.tokens_per_s(tokens // 4)  # warm replays
    tps = graphed.tokens_per_s(tokens) * batch
    kv = sum(k.numel() * k.element_size() * 2 for k, _ in step.caches) / 1e9
    return tps, torch.cuda.max_memory_allocated() / 1e9, kv


def main() -> None:
    from bench_kernels import copy_gbps

    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    ap.add_argument("--out", default="bench/decode/decode.csv")
    ap.add_argument("--models", default="llama3-8b-shape",
                    help=f"random-weight shapes ('' skips): {', '.join(SHAPE_MODELS)}")
    ap.add_argument("--lattices", default="24to10,20to8", help="packed runs ('' skips)")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,4,16")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--policy", default="", help="KernelPolicy fields for the packed runs, "
                    "e.g. pdl=0,fused_small=1")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile the non-linear regions (both models)")
    ap.add_argument("--compile_mode", default="default",
                    help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--max_len", type=int, default=None,
                    help="static cache length (default: just enough for the run)")
    ap.add_argument("--checkpoint", default=None, help="LiftQuant checkpoint folder")
    ap.add_argument("--fp_model", default="demo", help="its bf16 original: folder or 'demo'")
    ap.add_argument("--model_name", default=None, help="model column for --checkpoint rows")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--lm_head_bits", type=int, default=16, choices=(16, 8),
                    help="8: the packed runs store the head in per-channel int8 "
                    "(kernels.int8_head; config column <lattice>+head8)")
    ap.add_argument("--host_embed", action="store_true",
                    help="packed runs keep the token embedding table in host memory "
                    "(engine.step host_embed; config column <lattice>...+hostemb)")
    args = ap.parse_args()
    torch.manual_seed(0)
    mode = args.compile_mode if args.compile else None
    policy = parse_policy(args.policy)
    cache_len = args.max_len or max_len(args.tokens)
    base = {**record_fields(device="cuda"), "compile": mode or "none", "policy": args.policy,
            "max_len": cache_len}
    copy = copy_gbps()
    print(f"{base['gpu']}: copy {copy:.1f} GB/s (read + write), policy {policy}", flush=True)
    runs = []  # (model name, config, backend, loader); each model's bf16 run comes first
    for name in [m for m in args.models.split(",") if m]:
        cfg = SHAPE_MODELS[name]()
        if name in BF16_MODELS:
            runs.append((name, "bf16", "cublas", lambda c=cfg: build_model(c, None, "torch")))
        tag = ("+head8" if args.lm_head_bits == 8 else "") + ("+hostemb" if args.host_embed
                                                               else "")
        runs += [(name, lat + tag, args.backend,
                  lambda c=cfg, lat=lat: head8(build_model(c, lat, args.backend, policy=policy,
                                                           host_embed=args.host_embed),
                                               args.lm_head_bits))
                 for lat in args.lattices.split(",") if lat]
    if args.checkpoint:
        name = args.model_name or ("smollm2-135m" if args.fp_model == "demo"
                                   else Path(args.fp_model).name)
        original, quantized, lattice = load_pair(args.checkpoint, args.fp_model, args.backend,
                                                 policy)
        runs += [(name, "bf16", None, original), (name, lattice, args.backend, quantized)]
    rows, bf16_tps = [], {}
    for name, config, backend, load in runs:
        torch.cuda.empty_cache()
        model = load()
        if backend is None:  # the original's loader says which baseline it built
            model, backend = model
        wbytes = weight_bytes(model) / 1e9
        for batch in map(int, args.batch.split(",")):
            tps, peak, kv = measure(model, tokens=args.tokens, compile_mode=mode, batch=batch,
                                    cache_len=cache_len,
                                    host_embed=args.host_embed and config != "bf16")
            roof = batch * copy / wbytes
            ref = bf16_tps.setdefault((name, batch), tps) if config == "bf16" else \
                bf16_tps.get((name, batch))
            rows.append({**base, "model": name, "config": config, "backend": backend,
                         "batch": batch, "decode_tokens_per_s": f"{tps:.1f}",
                         "bf16_tokens_per_s": f"{ref:.1f}" if ref else "",
                         "speedup": f"{tps / ref:.2f}" if ref else "",
                         "peak_mem_gb": f"{peak:.2f}", "weight_gb": f"{wbytes:.3f}",
                         "kv_gb": f"{kv:.3f}", "roofline_tokens_per_s": f"{roof:.1f}",
                         "fraction_of_roofline": f"{tps / roof:.3f}"})
            print(f"{name} {config} batch {batch}: {tps:.1f} tok/s"
                  + (f" (x{tps / ref:.2f} vs bf16)" if ref else "")
                  + f", {tps / roof:.1%} of the {roof:.0f} tok/s roofline ({wbytes:.2f} GB/step),"
                  f" peak {peak:.2f} GB", flush=True)
            merge_csv_rows(args.out, rows, KEY, columns=COLUMNS)  # as rows arrive
        del model


if __name__ == "__main__":
    main()
