"""An 8-bit LM head: per-output-channel symmetric int8 weights (issue 15, optional head).

A bf16 head is about 28 % of an 8B model's decode bytes at 2.5 bits per weight, so storing it
in int8 halves that share. ``W ~= diag(scale) Q`` with ``Q = round(W / scale)`` in [-127, 127]
and ``scale = max |W_row| / 127`` (one fp16 per output channel; the row's largest weight is
exact). :class:`Int8Linear` is the buffers-only inference form: ``weight_int8`` (out, in) and
``weight_scale_bits`` (out,), the fp16 scales stored as their int16 bit patterns so that the
loaders' cast of dense tensors to the activation dtype leaves them exact. Its storage is
``out * in * 8 + out * 16`` bits, which ``checkpoint.bits_report`` counts as the head's.

Decode: ``scale * (x @ Q^T)``. The torch path converts Q to the activation dtype (int8 values
are exact in fp16/bf16) and runs one matmul; on CUDA (or under ``TRITON_INTERPRET=1``) a Triton
kernel reads the int8 weights directly (``liftquant::int8_linear``), one pass over 1 byte per
weight for up to 16 tokens (``tl.dot`` on a 16-token tile: batch 1 pads the tile, which costs
tensor-core time only), for up to :data:`GEMV_MAX_TOKENS` tokens.

:func:`quantize_lm_head` converts a model's head in place (a tied head is untied first: the
embedding stays in its dtype); the checkpoint records ``quantization_config["lm_head"] =
{"bits": 8, "scheme": SCHEME, "module": name}`` and :func:`swap_int8_head` rebuilds the skeleton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liftquant.kernels.int1_words import HAS_TRITON, check_triton, device_ctx
from liftquant.kernels.policy import interpreting

SCHEME = "int8_per_channel_symmetric"
QMAX = 127
# Tokens up to which the Triton kernel runs (one pass over the weights per BLOCK_M tokens);
# more tokens (prefill) take the torch matmul.
GEMV_MAX_TOKENS = 16
BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 128


class Int8Linear(nn.Module):
    """``scale * (x @ Q^T)`` with int8 ``Q`` (out, in) and fp16 per-row ``scale``; no bias."""

    def __init__(self, in_features: int, out_features: int, *,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features,
                                                        dtype=torch.int8, device=device))
        self.register_buffer("weight_scale_bits", torch.zeros(out_features, dtype=torch.int16,
                                                              device=device))

    @property
    def scale(self) -> Tensor:
        return self.weight_scale_bits.view(torch.float16)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("the int8 head has no bias (LM heads have none)")
        W = linear.weight.detach().float()
        scale = (W.abs().amax(dim=1) / QMAX).clamp_min(2.0**-24).half()  # (out,) fp16
        q = torch.round(W / scale.float()[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
        layer = cls(linear.in_features, linear.out_features, device=W.device)
        layer.weight_int8.copy_(q)
        layer.weight_scale_bits.copy_(scale.view(torch.int16))
        return layer

    @torch.no_grad()
    def dequantize_weight(self) -> Tensor:
        """Dense equivalent weight (out, in) in float32."""
        return self.weight_int8.float() * self.scale.float()[:, None]

    def storage_bits(self) -> dict[str, int]:
        return {"code_bits": self.out_features * self.in_features * 8,
                "side_bits": self.out_features * 16,
                "weights": self.out_features * self.in_features}

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.numel() // x.shape[-1]
        if (HAS_TRITON and (x.is_cuda or interpreting()) and tokens <= GEMV_MAX_TOKENS
                and x.dtype in (torch.float16, torch.bfloat16)
                and not (x.requires_grad and torch.is_grad_enabled())):
            out = torch.ops.liftquant.int8_linear(x.reshape(-1, self.in_features),
                                                  self.weight_int8, self.weight_scale_bits)
            return out.reshape(*x.shape[:-1], self.out_features)
        return reference(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def reference(layer: Int8Linear, x: Tensor) -> Tensor:
    """The torch path (and the oracle of the Triton GEMV)."""
    return F.linear(x, layer.weight_int8.to(x.dtype)) * layer.scale.to(x.dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _int8_gemm_body(X, W, S, OUT, B, N, K, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr):
        """Up to ``BM`` tokens per program: one pass over the int8 rows for all of them
        (``tl.dot`` in fp16 with fp32 accumulation; int8 values are exact in fp16)."""
        pn = tl.program_id(0)
        pm = tl.program_id(1)
        rows = pn * BN + tl.arange(0, BN)
        toks = pm * BM + tl.arange(0, BM)
        rmask = rows < N
        tmask = toks < B
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < K
            x = tl.load(X + toks.to(tl.int64)[:, None] * K + ks[None, :],
                        mask=tmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(W + rows.to(tl.int64)[:, None] * K + ks[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0)
            acc = tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)), acc)
        scale = tl.load(S + rows, mask=rmask, other=0).to(tl.float16, bitcast=True)
        out = acc * scale.to(tl.float32)[None, :]
        tl.store(OUT + toks.to(tl.int64)[:, None] * N + rows[None, :],
                 out.to(OUT.dtype.element_ty), mask=tmask[:, None] & rmask[None, :])

    @triton.jit
    def _int8_gemm_kernel(X, W, S, OUT, B, N, K, BM: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr):
        _int8_gemm_body(X, W, S, OUT, B, N, K, BM, BN, BK)

    @triton.jit
    def _int8_gemm_kernel_interp(X, W, S, OUT, B, N, K: tl.constexpr, BM: tl.constexpr,
                                 BN: tl.constexpr, BK: tl.constexpr):
        # The interpreter (numpy 2) needs constexpr loop bounds; same body otherwise.
        _int8_gemm_body(X, W, S, OUT, B, N, K, BM, BN, BK)


def launch_int8_gemv(x: Tensor, weight: Tensor, scale_bits: Tensor, *, block_n: int = BLOCK_N,
                     block_k: int = BLOCK_K, block_m: int = BLOCK_M) -> Tensor:
    """``scale * (x @ Q^T)`` for ``x`` (B, K): one program per ``block_n`` rows and
    ``block_m`` tokens, so the int8 weights are read once per ``block_m`` tokens."""
    check_triton(x)
    B, K = x.shape
    N = weight.shape[0]
    out = torch.empty(B, N, device=x.device, dtype=x.dtype)
    kernel = _int8_gemm_kernel_interp if interpreting() else _int8_gemm_kernel
    with device_ctx(x):
        kernel[(-(-N // block_n), -(-B // block_m))](
            x.contiguous(), weight.contiguous(), scale_bits, out, B, N, K, BM=block_m,
            BN=block_n, BK=block_k, num_warps=4)
    return out


@torch.library.custom_op("liftquant::int8_linear", mutates_args=())
def int8_linear(x: Tensor, weight: Tensor, scale_bits: Tensor) -> Tensor:
    """Int8 head GEMV; see :func:`launch_int8_gemv`."""
    return launch_int8_gemv(x, weight, scale_bits)


@int8_linear.register_fake
def _(x, weight, scale_bits):
    return x.new_empty(x.shape[0], weight.shape[0])


def head_name(model: nn.Module) -> str:
    """The dotted name of the model's output embedding (the LM head)."""
    head = model.get_output_embeddings()
    return next(n for n, m in model.named_modules() if m is head)


@torch.no_grad()
def quantize_lm_head(model: nn.Module, *, bits: int = 8) -> dict:
    """Replace the LM head by an :class:`Int8Linear` in place (untying a tied head; the input
    embedding keeps its dtype). Returns the ``quantization_config["lm_head"]`` entry."""
    from liftquant.models.adapters import set_module

    if bits != 8:
        raise ValueError(f"lm_head bits {bits}: only 8 (per-channel int8) is supported")
    name = head_name(model)
    head = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
        getattr(model.config, "get_text_config", lambda: model.config)().tie_word_embeddings = \
            False
    set_module(model, name, Int8Linear.from_linear(head))
    return {"bits": 8, "scheme": SCHEME, "module": name}


def swap_int8_head(model: nn.Module, entry: dict) -> None:
    """Loader side: replace ``entry["module"]`` with a meta-device :class:`Int8Linear`."""
    from liftquant.models.adapters import set_module

    if entry.get("scheme") != SCHEME or entry.get("bits") != 8:
        raise ValueError(f"unsupported lm_head quantization {entry}; this version reads "
                         f"{{'bits': 8, 'scheme': {SCHEME!r}}}")
    name = entry.get("module", "lm_head")
    old = model.get_submodule(name)
    set_module(model, name, Int8Linear(old.in_features, old.out_features, device="meta"))
