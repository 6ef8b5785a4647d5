"""Greedy decode of Llama-layout models over our own static KV cache: batched prefill, then
one step per token (compiled non-linear regions, one CUDA graph per step in ``graph.py``).

The step calls the model's own linear modules (``nn.Linear`` -> cuBLAS, ``PackedLiftLinear``
-> its kernel backend, whose custom ops stay opaque) and runs everything between them as three
functions of tensors: residual add + RMSNorm, rotary + KV-cache write + attention, SiLU gate.
Compiled with ``torch.compile`` they are traced once per shape and reused by every layer and by
every model of that shape, so compile time does not grow with depth and dense and quantized
models run the same code (a fair comparison). Where the planner sends a packed group or down
projection through the two-kernel decode path with prologues on (``KernelPolicy.
fuse_prologues``), its input (add + RMSNorm, or the SiLU gate) is computed inside its T* launch,
in the same roundings.

Module paths come from the model adapter (``liftquant.models.adapters``): the block list,
embedding, final norm, head, rotary embedding, the linear groups (q/k/v, o, gate/up, down) and
the norms that feed them (``norm_fusion``); :func:`step_layout` refuses layouts this step does
not reproduce (q/k norms, sliding windows, non-SiLU MLPs, blocks of different kinds).

:meth:`DecodeStep.prefill` runs the whole prompt as one batch of tokens, so packed layers take
the planner's GEMM path, with causal attention over the cache. The KV cache is one buffer per
layer, ``(n_kv, max_len, head_dim)``; attention groups the query heads by KV head, so GQA needs
no repeated KV. The arithmetic follows transformers' Llama (RMSNorm in fp32, rotary and
residuals in the model dtype, softmax in fp32); ``tests/test_engine.py`` checks it against the
HF forward and ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liftquant.engine.groups import sibling_groups, silu_linear, takes_prologue


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
    """Attention of ``T`` new tokens per sequence at positions ``pos`` (T,): rotary on q/k,
    write k/v at ``pos``, each token attends to the cache slots up to its own position.

    ``q`` (B, T, Hq hd), ``k``/``v`` (B, T, n_kv hd), caches (B, n_kv, L, hd), tables (L, hd).
    """
    B, n_kv, L, hd = k_cache.shape
    T = q.shape[1]
    cos, sin = cos_t.index_select(0, pos), sin_t.index_select(0, pos)  # (T, hd)
    q = q.view(B, T, -1, hd).transpose(1, 2)  # (B, Hq, T, hd)
    k = k.view(B, T, n_kv, hd).transpose(1, 2)  # (B, n_kv, T, hd)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v.view(B, T, n_kv, hd).transpose(1, 2))
    qg = q.reshape(B, n_kv, -1, hd)  # (B, n_kv, n_rep T, hd): query heads grouped by KV head
    scores = torch.matmul(qg, k_cache.transpose(-1, -2)).float() * scaling  # (.., n_rep T, L)
    scores = scores.view(B, n_kv, -1, T, L)  # (B, n_kv, n_rep, T, L)
    live = torch.arange(L, device=pos.device)[None, :] <= pos[:, None]  # (T, L) causal
    probs = torch.softmax(scores.masked_fill(~live, float("-inf")), dim=-1).to(q.dtype)
    out = torch.matmul(probs.view(B, n_kv, -1, L), v_cache)  # (B, n_kv, n_rep T, hd)
    return out.view(B, -1, T, hd).transpose(1, 2).reshape(B, T, -1)  # (B, T, Hq hd)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


@dataclass(frozen=True)
class StepLayout:
    """Module paths the step reads, from the model adapter."""

    blocks: str
    embed: str
    final_norm: str
    lm_head: str
    rotary: str
    qkv: tuple[str, str, str]
    o: str
    gate_up: tuple[str, str]
    down: str
    attn_norm: str
    mlp_norm: str


def step_layout(model: nn.Module, adapter=None) -> StepLayout:
    """The step's module paths for ``model`` from its adapter (``models.get_adapter``);
    ``ValueError`` naming the reason when the step does not reproduce this architecture."""
    from liftquant.models import get_adapter

    cfg = model.config

    def refuse(why: str):
        raise ValueError(f"the decode step does not support {cfg.model_type}: {why}; use the "
                         "HF engine (--engine hf)")

    try:
        adapter = adapter or get_adapter(cfg)
    except ValueError as err:
        refuse(str(err).split(". ")[0])

    if getattr(cfg, "hidden_act", "silu") != "silu":
        refuse(f"hidden_act {cfg.hidden_act!r} (SiLU MLPs only)")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        refuse("sliding-window attention")
    blocks = adapter.get_blocks(model)
    group_sets = {adapter.block_groups(b) for b in blocks}
    if len(group_sets) != 1:
        refuse("its blocks have different layouts")
    groups = group_sets.pop()
    if [len(g) for g in groups] != [3, 1, 2, 1]:
        refuse(f"linear groups {groups} are not q/k/v, o, gate/up, down")
    norms = {i: name for name, i in adapter.norm_fusion}
    if 0 not in norms or 2 not in norms:
        refuse("the adapter names no norms for the attention and MLP inputs")
    attn = blocks[0].get_submodule(groups[0][0].rpartition(".")[0])
    if any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
        refuse("q/k norms inside attention")
    rotary = [p for p in adapter.pre_block if p.endswith("rotary_emb")]
    if not rotary:
        refuse("the adapter names no rotary embedding")
    return StepLayout(blocks=adapter.blocks, embed=adapter.embed, final_norm=adapter.final_norm,
                      lm_head=adapter.lm_head, rotary=rotary[0], qkv=tuple(groups[0]),
                      o=groups[1][0], gate_up=tuple(groups[2]), down=groups[3][0],
                      attn_norm=norms[0], mlp_norm=norms[2])


def _host_table(embed: nn.Module, lm_head: nn.Module) -> Tensor:
    """The embedding table in host memory (pinned where CUDA is available); the module's
    weight is replaced by it, so an accelerator copy is freed."""
    weight = embed.weight
    head = getattr(lm_head, "weight", None)
    if head is not None and head.data_ptr() == weight.data_ptr():
        raise ValueError("host_embed: the head shares the embedding table (tied weights), so "
                         "the table is read in full every step and must stay on the device")
    table = weight.detach()
    if table.device.type != "cpu":
        table = table.to("cpu", copy=True)
    if torch.cuda.is_available() and not table.is_pinned():
        table = table.pin_memory()
    embed.weight = nn.Parameter(table, requires_grad=False)
    return table


class DecodeStep:
    """Batched prefill and one greedy decode step of ``model`` (HF causal LM) over static
    buffers.

    ``batch``: independent sequences decoded together (same positions; benchmarks of batch 4
    and 16, where the packed layers take the planner's batch path).
    ``compile_mode``: None runs eagerly; otherwise the three region functions of the decode
    step are wrapped in ``torch.compile(mode=compile_mode, dynamic=False, fullgraph=True)``
    (prefill runs them eagerly: its token count changes per prompt). ``group``: run packed
    q/k/v and gate/up as one transform and one GEMV each where the planner takes the decode
    kernels (``engine.groups``; their buffers become views of the group's tensors).
    ``host_embed``: the token embedding table lives in host memory (pinned on CUDA machines;
    moved there if it is on the accelerator, which frees its bytes there): before each step
    :meth:`feed` copies the current tokens' rows into a static input buffer, outside any CUDA
    graph (one read of the token per step). Needs a head that does not share the table.
    """

    def __init__(self, model: nn.Module, max_len: int, *, compile_mode: str | None = None,
                 group: bool = True, layout: StepLayout | None = None, batch: int = 1,
                 host_embed: bool = False):
        cfg = model.config
        self.layout = lay = layout or step_layout(model)
        self.model, self.max_len = model, max_len
        self.blocks = model.get_submodule(lay.blocks)
        self.embed = model.get_submodule(lay.embed)
        self.final_norm = model.get_submodule(lay.final_norm)
        self.lm_head = model.get_submodule(lay.lm_head)
        dev, dt = self.final_norm.weight.device, self.embed.weight.dtype
        self.host_table = _host_table(self.embed, self.lm_head) if host_embed else None
        n_kv = cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.batch = batch
        self.caches = [(torch.zeros(batch, n_kv, max_len, hd, device=dev, dtype=dt),
                        torch.zeros(batch, n_kv, max_len, hd, device=dev, dtype=dt))
                       for _ in self.blocks]
        positions = torch.arange(max_len, device=dev)[None]
        probe = torch.zeros(1, cfg.hidden_size, device=dev, dtype=dt)
        cos, sin = model.get_submodule(lay.rotary)(probe, positions)  # HF tables
        self.cos, self.sin = cos[0].to(dt), sin[0].to(dt)  # (max_len, hd)
        self.zero = torch.zeros(batch, 1, cfg.hidden_size, device=dev, dtype=dt)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        if self.host_table is not None:  # the embedded current tokens, and their host staging
            self.x_in = torch.zeros(batch, 1, cfg.hidden_size, device=dev, dtype=dt)
            self._stage = torch.empty(batch, cfg.hidden_size, dtype=dt,
                                      pin_memory=dev.type == "cuda")
        self.eps, self.scaling = float(cfg.rms_norm_eps), hd**-0.5
        paths = (lay.qkv, lay.gate_up)
        self.groups = [sibling_groups(b, paths) if group else {} for b in self.blocks]

        def wrap(fn):
            if compile_mode is None:
                return fn
            return torch.compile(fn, mode=compile_mode, dynamic=False, fullgraph=True)

        self.eager_regions = (add_rms_norm, attend, silu_mul)
        self.regions = tuple(map(wrap, self.eager_regions))

    def _norm_then(self, group, members: tuple, h: Tensor, delta: Tensor, weight: Tensor,
                   add_norm) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Residual add + RMSNorm, then the sibling projections that read the result:
        (new residual, their outputs)."""
        if group is not None and takes_prologue(group.layers[0], h):
            return group.add_norm_forward(h, delta, weight, self.eps)
        h, x = add_norm(h, delta, weight, self.eps)
        return h, (group(x) if group is not None else tuple(m(x) for m in members))

    def _down(self, down: nn.Module, gate: Tensor, up: Tensor, silu) -> Tensor:
        if takes_prologue(down, gate):
            return silu_linear(down, gate, up)
        return down(silu(gate, up))

    def forward(self, ids: Tensor, positions: Tensor, regions) -> Tensor:
        """Hidden states through every block for ``ids`` (B, T) at ``positions`` (T,), caches
        written; the final-norm output of the last token (B, 1, hidden)."""
        lay = self.layout
        add_norm, attention, silu = regions
        if self.host_table is None:
            delta = self.embed(ids)
        elif ids is self.ids:  # a decode step: rows staged by feed()
            delta = self.x_in
        else:
            delta = self.host_table[ids.cpu()].to(self.x_in.device)
        h = self.zero if ids.shape[1] == 1 else self.zero.expand_as(delta)
        for i, block in enumerate(self.blocks):
            groups = self.groups[i]
            qkv_mods = tuple(block.get_submodule(p) for p in lay.qkv)
            h, qkv = self._norm_then(groups.get(lay.qkv), qkv_mods, h, delta,
                                     block.get_submodule(lay.attn_norm).weight, add_norm)
            a = attention(*qkv, self.cos, self.sin, positions, *self.caches[i], self.scaling)
            gu_mods = tuple(block.get_submodule(p) for p in lay.gate_up)
            h, gate_up = self._norm_then(groups.get(lay.gate_up), gu_mods, h,
                                         block.get_submodule(lay.o)(a),
                                         block.get_submodule(lay.mlp_norm).weight, add_norm)
            delta = self._down(block.get_submodule(lay.down), *gate_up, silu)
        if h.shape[1] > 1:  # prefill: only the last token's logits are needed
            h, delta = h[:, -1:], delta[:, -1:]
        return add_norm(h, delta, self.final_norm.weight, self.eps)[1]

    @torch.no_grad()
    def feed(self) -> None:
        """``host_embed``: copy the embedding rows of the tokens in ``ids`` into the static
        input buffer (reads ``ids``: waits for the step that wrote them). No-op otherwise."""
        if self.host_table is None:
            return
        torch.index_select(self.host_table, 0, self.ids.view(-1).cpu(), out=self._stage)
        self.x_in.copy_(self._stage.view_as(self.x_in), non_blocking=True)

    @torch.no_grad()
    def __call__(self) -> Tensor:
        """Consume ``ids`` at ``pos``; leave the greedy next token in ``ids``; return logits
        (B, 1, V). With ``host_embed`` the rows are fed first, except while a CUDA graph is
        being captured (its replays are fed by the caller, ``engine.graph``)."""
        if self.host_table is not None and not (self.x_in.is_cuda and
                                                torch.cuda.is_current_stream_capturing()):
            self.feed()
        logits = self.lm_head(self.forward(self.ids, self.pos, self.regions))
        self.ids.copy_(logits.argmax(-1))
        self.pos.add_(1)
        return logits

    @torch.no_grad()
    def prefill(self, prompt: Tensor) -> Tensor:
        """A fresh context from ``prompt`` (B, T) in one batched pass (the packed layers' GEMM
        path): logits (B, 1, V) after its last token; ``ids`` then holds the greedy next token
        and ``pos`` is T. Slots past ``pos`` are masked, so the old context needs no clearing."""
        T = prompt.shape[1]
        if prompt.shape[0] != self.batch:
            raise ValueError(f"prompt batch {prompt.shape[0]} != the step's batch {self.batch}")
        if T > self.max_len:
            raise ValueError(f"prompt of {T} tokens exceeds the cache of {self.max_len}")
        positions = torch.arange(T, device=self.pos.device)
        logits = self.lm_head(self.forward(prompt, positions, self.eager_regions))
        self.ids.copy_(logits[:, -1:].argmax(-1))
        self.pos.fill_(T)
        return logits
