"""Batch-1 greedy decode of Llama-family models: compiled non-linear regions, one CUDA graph.

The step calls the model's own linear modules (``nn.Linear`` -> cuBLAS, ``PackedLiftLinear``
-> its kernel backend, whose custom ops stay opaque) and runs everything between them as three
functions of tensors: residual add + RMSNorm, rotary + KV-cache write + attention, SiLU gate.
Compiled with ``torch.compile`` they are traced once per shape and reused by every layer and by
every model of that shape, so compile time does not grow with depth and dense and quantized
models run the same code (a fair comparison). Where a packed group or down projection runs the
Triton decode kernels, its input (add + RMSNorm, or the SiLU gate) is computed inside its T*
launch instead (:data:`FUSE_PROLOGUES`), in the same roundings. :class:`GraphedDecode`
captures one step as a CUDA graph and replays it per token.

The KV cache is our own static buffer per layer, ``(n_kv, max_len, head_dim)``; attention
groups the query heads by KV head (``q.view(n_kv, n_rep, hd)``), so GQA needs no repeated KV.
The arithmetic follows transformers' Llama (RMSNorm in fp32, rotary and residuals in the
model dtype, softmax in fp32); ``tests/test_kernels.py`` checks it against the HF forward.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liftquant.kernels.groups import silu_linear, takes_prologue

# Decoder layouts this step reproduces exactly (q/k/v biases live in the linear modules).
LLAMA_LIKE = ("llama", "qwen2", "mistral")


def add_rms_norm(h: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Residual add, then HF ``LlamaRMSNorm`` of the sum: (new residual, normed input)."""
    h = h + delta
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return h, weight * x.to(h.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attend(q: Tensor, k: Tensor, v: Tensor, cos_t: Tensor, sin_t: Tensor, pos: Tensor,
           k_cache: Tensor, v_cache: Tensor, scaling: float) -> Tensor:
    """One token's attention: rotary on q/k, write k/v at ``pos``, attend to slots <= pos.

    ``q`` (1, 1, Hq hd), ``k``/``v`` (1, 1, n_kv hd), caches (n_kv, L, hd), tables (L, hd).
    """
    n_kv, L, hd = k_cache.shape
    cos, sin = cos_t.index_select(0, pos), sin_t.index_select(0, pos)  # (1, hd)
    q = q.view(-1, hd)  # (Hq, hd)
    k = k.view(n_kv, hd)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k_cache.index_copy_(1, pos, k[:, None])
    v_cache.index_copy_(1, pos, v.view(n_kv, 1, hd))
    qg = q.view(n_kv, -1, hd)  # (n_kv, n_rep, hd): query heads grouped by KV head
    scores = torch.matmul(qg, k_cache.transpose(1, 2)).float() * scaling  # (n_kv, n_rep, L)
    live = torch.arange(L, device=pos.device) <= pos
    probs = torch.softmax(scores.masked_fill(~live, float("-inf")), dim=-1).to(q.dtype)
    return torch.matmul(probs, v_cache).reshape(1, 1, -1)  # (1, 1, Hq hd)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


# Whether the step runs residual add + RMSNorm before a packed q/k/v or gate/up group, and the
# SiLU gate before a packed down projection, inside that layer's T* launch (groups.
# add_norm_forward, silu_linear): three fewer launches per decoder layer. Read when the step
# runs (so when a graph is captured); benchmarks flip it to compare.
FUSE_PROLOGUES = True


class DecodeStep:
    """One greedy decode step of ``model`` (HF causal LM) over static buffers.

    ``compile_mode``: None runs eagerly; otherwise the three region functions are wrapped in
    ``torch.compile(mode=compile_mode, dynamic=False, fullgraph=True)`` (``"default"``,
    ``"max-autotune-no-cudagraphs"``; graphs are captured by :class:`GraphedDecode`).
    ``group``: run packed q/k/v and gate/up as one transform and one GEMV each
    (:mod:`~liftquant.kernels.groups`; their buffers become views of the group's tensors).
    """

    def __init__(self, model: nn.Module, max_len: int, *, compile_mode: str | None = None,
                 group: bool = True):
        cfg = model.config
        if cfg.model_type not in LLAMA_LIKE or getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"decode step supports {LLAMA_LIKE} with SiLU, not "
                             f"{cfg.model_type}/{getattr(cfg, 'hidden_act', None)}")
        self.model, self.max_len = model, max_len
        emb = model.model.embed_tokens.weight
        dev, dt = emb.device, emb.dtype
        n_kv = cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.caches = [(torch.zeros(n_kv, max_len, hd, device=dev, dtype=dt),
                        torch.zeros(n_kv, max_len, hd, device=dev, dtype=dt))
                       for _ in model.model.layers]
        positions = torch.arange(max_len, device=dev)[None]
        cos, sin = model.model.rotary_emb(emb[:1], positions)  # HF tables, any rope scaling
        self.cos, self.sin = cos[0].to(dt), sin[0].to(dt)  # (max_len, hd)
        self.zero = torch.zeros(1, 1, cfg.hidden_size, device=dev, dtype=dt)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.eps, self.scaling = float(cfg.rms_norm_eps), hd**-0.5
        if group:
            from liftquant.kernels.groups import group_decoder_layers

            self.groups = group_decoder_layers(model.model.layers)
        else:
            self.groups = [{} for _ in model.model.layers]

        def wrap(fn):
            if compile_mode is None:
                return fn
            return torch.compile(fn, mode=compile_mode, dynamic=False, fullgraph=True)

        self.add_norm, self.attend, self.silu_mul = map(wrap, (add_rms_norm, attend, silu_mul))

    def _norm_then(self, group, members: tuple, h: Tensor, delta: Tensor,
                   weight: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Residual add + RMSNorm, then the sibling projections that read the result:
        (new residual, their outputs)."""
        if group is not None and FUSE_PROLOGUES and takes_prologue(group.layers[0], h):
            return group.add_norm_forward(h, delta, weight, self.eps)
        h, x = self.add_norm(h, delta, weight, self.eps)
        return h, (group(x) if group is not None else tuple(m(x) for m in members))

    def _down(self, mlp: nn.Module, gate: Tensor, up: Tensor) -> Tensor:
        if FUSE_PROLOGUES and takes_prologue(mlp.down_proj, gate):
            return silu_linear(mlp.down_proj, gate, up)
        return mlp.down_proj(self.silu_mul(gate, up))

    @torch.no_grad()
    def __call__(self) -> Tensor:
        """Consume ``ids`` at ``pos``; leave the greedy next token in ``ids``; return logits."""
        m = self.model.model
        h, delta = self.zero, m.embed_tokens(self.ids)
        for i, layer in enumerate(m.layers):
            att, mlp, groups = layer.self_attn, layer.mlp, self.groups[i]
            h, qkv = self._norm_then(groups.get("qkv"), (att.q_proj, att.k_proj, att.v_proj),
                                     h, delta, layer.input_layernorm.weight)
            a = self.attend(*qkv, self.cos, self.sin, self.pos, *self.caches[i], self.scaling)
            h, gate_up = self._norm_then(groups.get("gate_up"), (mlp.gate_proj, mlp.up_proj),
                                         h, att.o_proj(a), layer.post_attention_layernorm.weight)
            delta = self._down(mlp, *gate_up)
        _, x = self.add_norm(h, delta, m.norm.weight, self.eps)
        logits = self.model.lm_head(x)  # (1, 1, V)
        self.ids.copy_(logits.argmax(-1))
        self.pos.add_(1)
        return logits

    def prefill(self, prompt: Tensor) -> None:
        """Feed ``prompt`` (1, T) token by token; ``ids`` then holds the first new token."""
        for t in range(prompt.shape[1]):
            self.ids.copy_(prompt[:, t:t + 1])
            self()


class GraphedDecode:
    """A :class:`DecodeStep` captured as one CUDA graph (after eager warm-up steps, which also
    build and tune the kernels), replayed per token."""

    def __init__(self, step: DecodeStep, *, warmup: int = 8) -> None:
        self.step = step
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()  # static output: each replay rewrites it

    def tokens_per_s(self, n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            self.graph.replay()
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)
