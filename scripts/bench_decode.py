"""Batch-1 greedy decode of a Llama-3-8B-shaped model, bf16 vs LiftQuant -> bench/decode.csv.

The model is built from a ``LlamaConfig`` with random weights (no checkpoint, no calibration):
bf16 everywhere, or with every decoder linear replaced by a ``PackedLiftLinear`` with random
codes. Both run the same decode step (embed, rotary, decoder layers with a transformers
``StaticCache``, norm, head, argmax) captured once as a CUDA graph and replayed per token.
``python scripts/bench_decode.py --out bench/decode.csv --lattices 24to10,20to8``
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import torch
from bench_kernels import fill_random_
from torch import nn

from liftquant.kernels import registry
from liftquant.linear import PackedLiftLinear

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
COLUMNS = ["model", "config", "backend", "decode_tokens_per_s", "bf16_tokens_per_s", "speedup",
           "peak_mem_gb", "gpu", "commit"]
PROMPT, WARMUP, TOKENS = 32, 8, 256


def llama3_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, attn_implementation="sdpa")


@torch.no_grad()
def build_model(config, lattice: str | None, backend: str, device: str = "cuda") -> nn.Module:
    """Meta skeleton -> (packed linears) -> CUDA storage -> random init: peak = final size."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for layer in model.model.layers if lattice else []:
        for name in LINEARS:
            parent_name, attr = name.rsplit(".", 1)
            parent = layer.get_submodule(parent_name)
            lin = getattr(parent, attr)
            setattr(parent, attr, PackedLiftLinear(lin.in_features, lin.out_features,
                                                   spec=lattice, device="meta"))
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    for i, m in enumerate(model.modules()):
        if isinstance(m, PackedLiftLinear):
            fill_random_(m, seed=i)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(device)  # fp32 inv_freq
    registry.set_backend(model, backend)
    return model.eval()


class GraphedDecoder:
    """One greedy decode step over static buffers, captured as a CUDA graph."""

    def __init__(self, model, config, max_len: int, device: str = "cuda") -> None:
        from transformers import StaticCache

        self.model, self.max_len = model, max_len
        self.cache = StaticCache(config=config, max_cache_len=max_len)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        out = self.model(input_ids=prompt, past_key_values=self.cache, use_cache=True)
        self.ids.copy_(out.logits[:, -1:].argmax(-1))
        self.pos.fill_(prompt.shape[1])

    @torch.no_grad()
    def step(self) -> None:
        m = self.model.model
        h = m.embed_tokens(self.ids)  # (1, 1, H)
        pos_ids = self.pos.view(1, 1)
        pe = m.rotary_emb(h, pos_ids)
        mask = (self.slots <= self.pos).view(1, 1, 1, self.max_len)  # True = attend
        for layer in m.layers:
            h = layer(h, attention_mask=mask, position_ids=pos_ids, past_key_values=self.cache,
                      position_embeddings=pe)
        logits = self.model.lm_head(m.norm(h))  # (1, 1, V)
        self.ids.copy_(logits.argmax(-1))
        self.pos.add_(1)

    def capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP):  # builds Triton kernels, cuBLAS handles, lazy cache init
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def tokens_per_s(self, n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            self.graph.replay()
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)


def run(config, lattice: str | None, backend: str) -> tuple[float, float]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model(config, lattice, backend)
    dec = GraphedDecoder(model, config, PROMPT + WARMUP + 1 + 2 * TOKENS + 8)
    dec.prefill(torch.randint(0, config.vocab_size, (1, PROMPT), device="cuda"))
    dec.capture()
    dec.tokens_per_s(TOKENS // 4)  # warm replays
    tps = dec.tokens_per_s(TOKENS)
    peak = torch.cuda.max_memory_allocated() / 1e9
    del dec, model
    return tps, peak


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    ap.add_argument("--out", default="bench/decode.csv")
    ap.add_argument("--lattices", default="24to10,20to8")
    ap.add_argument("--backend", default="triton")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = llama3_8b_config()
    base = {"model": "llama3-8b-shape", "gpu": torch.cuda.get_device_name(),
            "commit": os.environ.get("LQ_COMMIT", "unknown")}
    bf16_tps, bf16_peak = run(config, None, "torch")
    rows = [{**base, "config": "bf16", "backend": "cublas", "decode_tokens_per_s": f"{bf16_tps:.1f}",
             "bf16_tokens_per_s": f"{bf16_tps:.1f}", "speedup": "1.00",
             "peak_mem_gb": f"{bf16_peak:.2f}"}]
    print(f"bf16: {bf16_tps:.1f} tok/s, peak {bf16_peak:.2f} GB", flush=True)
    write_csv(args.out, rows)
    for lattice in args.lattices.split(","):
        tps, peak = run(config, lattice, args.backend)
        rows.append({**base, "config": lattice, "backend": args.backend,
                     "decode_tokens_per_s": f"{tps:.1f}", "bf16_tokens_per_s": f"{bf16_tps:.1f}",
                     "speedup": f"{tps / bf16_tps:.2f}", "peak_mem_gb": f"{peak:.2f}"})
        print(f"{lattice}: {tps:.1f} tok/s (x{tps / bf16_tps:.2f} vs bf16), peak {peak:.2f} GB",
              flush=True)
        write_csv(args.out, rows)


if __name__ == "__main__":
    main()
