"""Batch-1 greedy decode tokens/s, bf16 vs LiftQuant -> bench/decode.csv.

* ``model=llama3-8b-shape``: a ``LlamaConfig`` of Llama-3-8B's shape with random weights (no
  checkpoint, no calibration): bf16 everywhere, or with every decoder linear replaced by a
  ``PackedLiftLinear`` with random codes (``--lattices``; empty skips this model).
* ``--checkpoint DIR`` (a LiftQuant checkpoint, ``liftquant.load_quantized``) against its bf16
  original ``--fp_model`` (a folder, or ``demo`` for SmolLM2-135M as converted in the liftquant
  cache); rows ``model=<name>``. If the original cannot be loaded (``demo`` never converted on
  this machine), a bf16 model of the same config with random weights stands in: decode speed
  depends on shapes only (backend ``cublas-random``).

Every model runs the same step (``liftquant.engine.step``): a 32-token prompt prefilled in
one batch (the GEMM path), warm-up, then one CUDA graph per step replayed for ``--tokens``
tokens. With
``--compile`` (default) the non-linear regions are torch.compiled once per shape and shared by
all layers and models. ``python scripts/bench_decode.py --out bench/decode.csv``
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from bench_kernels import fill_random_
from torch import nn

from liftquant.engine.graph import GraphedDecode
from liftquant.engine.step import DecodeStep
from liftquant.kernels import registry
from liftquant.linear import PackedLiftLinear
from liftquant.provenance import RECORD_KEY, record_fields
from liftquant.records import merge_csv_rows

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
COLUMNS = ["model", "config", "backend", "decode_tokens_per_s", "bf16_tokens_per_s", "speedup",
           "peak_mem_gb", "compile", "gpu", "commit"]
KEY = ("model", "config", "backend", "compile", *RECORD_KEY)  # other commits' rows are kept
PROMPT, WARMUP = 32, 8


def llama3_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False)


@torch.no_grad()
def build_model(config, lattice: str | None, backend: str, device: str = "cuda") -> nn.Module:
    """Meta skeleton -> (packed linears) -> device storage -> random init: peak = final size."""
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
    model.to_empty(device=device)
    model.tie_weights()  # to_empty unties shared parameters (SmolLM2's head)
    for p in model.parameters():
        p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    for i, m in enumerate(model.modules()):
        if isinstance(m, PackedLiftLinear):
            fill_random_(m, seed=i)
    rotary = type(model.model.rotary_emb)(config=config)  # fp32 inv_freq, computed on the CPU
    model.model.rotary_emb = rotary.to(device)
    registry.set_backend(model, backend)
    return model.eval()


def load_pair(checkpoint: str, fp_model: str, backend: str):
    """(loader of the bf16 original, loader of the quantized model, lattice name)."""
    from liftquant.checkpoint import load_quantized, read_quantization_config

    lattice = read_quantization_config(Path(checkpoint))["lattice"]

    def quantized():
        return load_quantized(checkpoint, device="cuda", dtype=torch.bfloat16,
                              backend=backend)[0]

    def original():
        from liftquant.models.loading import load_fp_model

        source = fp_model
        try:
            if fp_model == "demo":  # only an already converted copy: fetching or converting
                from liftquant.assets import DEFAULT_MODEL, cache_root  # takes minutes

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


def measure(model: nn.Module, *, tokens: int, compile_mode: str | None) -> tuple[float, float]:
    """Decode tokens/s and peak GPU memory (GB) while decoding."""
    step = DecodeStep(model, max_len(tokens), compile_mode=compile_mode)
    step.prefill(torch.randint(0, model.config.vocab_size, (1, PROMPT), device="cuda"))
    torch.cuda.reset_peak_memory_stats()  # kernel tuning's L2-flush buffer is not decode memory
    graphed = GraphedDecode(step, warmup=WARMUP)
    graphed.tokens_per_s(tokens // 4)  # warm replays
    tps = graphed.tokens_per_s(tokens)
    return tps, torch.cuda.max_memory_allocated() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    ap.add_argument("--out", default="bench/decode.csv")
    ap.add_argument("--lattices", default="24to10,20to8", help="8B-shaped runs ('' skips)")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile the non-linear regions (both models)")
    ap.add_argument("--compile_mode", default="default",
                    help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--checkpoint", default=None, help="LiftQuant checkpoint folder")
    ap.add_argument("--fp_model", default="demo", help="its bf16 original: folder or 'demo'")
    ap.add_argument("--model_name", default=None, help="model column for --checkpoint rows")
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    mode = args.compile_mode if args.compile else None
    base = {**record_fields(device="cuda"), "compile": mode or "none"}
    runs = []  # (model name, config, backend, loader); each model's bf16 run comes first
    if args.lattices:
        cfg = llama3_8b_config()
        runs.append(("llama3-8b-shape", "bf16", "cublas", lambda: build_model(cfg, None, "torch")))
        runs += [("llama3-8b-shape", lat, args.backend,
                  lambda lat=lat: build_model(cfg, lat, args.backend))
                 for lat in args.lattices.split(",")]
    if args.checkpoint:
        name = args.model_name or ("smollm2-135m" if args.fp_model == "demo"
                                   else Path(args.fp_model).name)
        original, quantized, lattice = load_pair(args.checkpoint, args.fp_model, args.backend)
        runs += [(name, "bf16", None, original), (name, lattice, args.backend, quantized)]
    rows, bf16_tps = [], {}
    for name, config, backend, load in runs:
        torch.cuda.empty_cache()
        model = load()
        if backend is None:  # the original's loader says which baseline it built
            model, backend = model
        tps, peak = measure(model, tokens=args.tokens, compile_mode=mode)
        del model
        ref = bf16_tps.setdefault(name, tps)
        rows.append({**base, "model": name, "config": config, "backend": backend,
                     "decode_tokens_per_s": f"{tps:.1f}", "bf16_tokens_per_s": f"{ref:.1f}",
                     "speedup": f"{tps / ref:.2f}", "peak_mem_gb": f"{peak:.2f}"})
        print(f"{name} {config}: {tps:.1f} tok/s (x{tps / ref:.2f} vs bf16), peak {peak:.2f} GB",
              flush=True)
        merge_csv_rows(args.out, rows, KEY, columns=COLUMNS)  # as rows arrive


if __name__ == "__main__":
    main()
