"""The two layer forms of LiftQuant (paper Eqs. 2-5).

``LiftLinear`` is the differentiable calibration form of one ``nn.Linear``:

* mode ``"proxy"`` (stage 1): ``W_eff = T^-1( Q_uniform( W T ) )`` with the learnable whitening
  ``T`` (:class:`~liftquant.core.whiten.KronWhitening`) and the STE proxy quantizer (Eq. 3);
* :meth:`LiftLinear.round_to_lattice` whitens the rows, normalises them by their RMS, encodes
  every d-chunk to its nearest lattice code (``lattice.encode``) and switches to
* mode ``"lattice"`` (stage 2, intra-block correction, Eq. 5): ``o = s * (sign(V) @ T*(x))``
  where ``V`` are latent weights (sign with straight-through gradient), ``s`` per-row scales and
  ``T*`` the fused transform (``s1``, ``L``, ``R``, ``s2_act``; Eq. 4), all trainable.

Stage 2 never holds a dense float latent matrix. Only the sign of a latent weight is used, and
Adam moves a weight by at most ``lr_t * adam_step_bound(t)`` per step (:func:`flip_margin`),
so a latent that starts farther from zero than the sum of those bounds can never change sign.
Such weights are frozen codes (``signs``, int8) and only the *flip candidates* (``|pre| <=
margin``) are trained (``cand``, float32, with their flat indices ``cand_idx``). Gradients and
updates of the candidates are exactly those of the dense formulation: the straight-through
gradient of the whole sign matrix is formed once per layer in backward, its squared norm is
kept for the block's global gradient clipping (:meth:`LiftLinear.pop_latent_sqnorm`) and only
the candidates' entries are kept.

``PackedLiftLinear`` is the buffers-only inference form, built from shapes alone, so loading a
checkpoint is "skeleton -> swap -> load_state_dict(strict=True)".

Legend: ``n`` in_features, ``out`` out_features, ``(n1, n2)`` = ``whiten.block_shape(n, d)``,
``K = n1 * (n2 / d) * D`` the lifted width (bits per row), ``s`` per-row scale.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from liftquant.core.lattice import LatticeSpec, decode, encode_candidates
from liftquant.core.pack import pack_signs, packed_width, unpack_signs
from liftquant.core.proxy import UniformProxy
from liftquant.core.whiten import (
    DEFAULT_BLOCK_SHAPE_RULE,
    KronWhitening,
    apply_fused,
    batched_factors,
    block_shape,
)
from liftquant.kernels.registry import layer_backend

# Row RMS floor before normalisation (all-zero rows stay zero instead of producing NaN).
RMS_FLOOR = 1e-8
# Side tensors (scales, s1, s2, fused factors) are stored in this dtype in packed layers.
SIDE_DTYPE = torch.float16
# Rows of a dense latent gradient squared per float32 chunk (bounds the temporary copy).
LATENT_NORM_ROWS = 1024


def lifted_width(in_features: int, spec: LatticeSpec,
                 rule: str = DEFAULT_BLOCK_SHAPE_RULE) -> int:
    """Number of sign bits per output row: ``K = n1 * (n2 / d) * D``."""
    n1, n2 = block_shape(in_features, spec.target_dim, rule)
    return n1 * (n2 // spec.target_dim) * spec.lifted_dim


def adam_step_bound(t: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """Upper bound of ``|m_hat_t| / sqrt(v_hat_t)`` for Adam at step ``t`` (1-based), any grads.

    Cauchy-Schwarz on ``m_t = (1 - b1) sum b1^(t-k) g_k`` against ``v_t = (1 - b2) sum b2^(t-k)
    g_k^2`` gives ``|m_t| <= (1 - b1) sqrt(sum_j<t r^j) sqrt(v_t / (1 - b2))`` with ``r = b1^2 /
    b2``; the bias corrections add ``sqrt(1 - b2^t) / (1 - b1^t)``. Equals 1 at ``t = 1``.
    """
    b1, b2 = betas
    r = b1 * b1 / b2
    geo = (1 - r**t) / (1 - r)
    return (1 - b1) / (1 - b1**t) * math.sqrt((1 - b2**t) / (1 - b2) * geo)


def flip_margin(lrs: list[float], betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """Largest distance an Adam-trained weight can travel with per-step learning rates ``lrs``:
    ``sum_t lr_t * adam_step_bound(t)`` (epsilon only shortens steps). Latent weights whose
    initial ``|pre|`` exceeds this keep their sign through stage 2."""
    return float(sum(lr * adam_step_bound(t + 1, betas) for t, lr in enumerate(lrs)))


_COMPILED_PROXY = None


def _compiled_proxy_weight():
    """``LiftLinear.proxy_weight`` under ``torch.compile``, built once per process.

    The unbound method is compiled, so every layer of one shape shares one graph (its
    parameters are graph inputs, not guarded constants); the elementwise chain around the
    two rotations (s1/s2 scaling, |w| max, STE round, clamp, and their backward) becomes a few
    fused kernels. Forward values equal the eager ones; gradients agree to float32 rounding.
    """
    global _COMPILED_PROXY
    if _COMPILED_PROXY is None:
        _COMPILED_PROXY = torch.compile(LiftLinear.proxy_weight)
    return _COMPILED_PROXY


class _CandidateSignMatmul(torch.autograd.Function):
    """``xt @ signs^T`` with straight-through gradients (Eq. 5) delivered to the flip candidates.

    ``signs`` (out, K) +-1 is current (refreshed from the candidates before the call): the int8
    signs, or their copy in the compute dtype (``LiftLinear.cache_signs``). The backward forms
    the dense STE gradient ``g^T xt`` (out, K) once, records its squared norm (or accumulates
    it over micro-batches) on ``layer`` and returns its entries at ``cand_idx``.
    """

    @staticmethod
    def forward(ctx, xt: Tensor, cand: Tensor, signs: Tensor, cand_idx: Tensor, layer):
        ctx.save_for_backward(xt)
        # ``signs`` is refreshed in place by every forward; its values only change after an
        # optimizer step (they are sign(cand)), so it is kept without the version check.
        ctx.signs, ctx.cand_idx, ctx.layer = signs, cand_idx, layer
        return xt @ signs.to(xt.dtype).T  # (..., out)

    @staticmethod
    def backward(ctx, g: Tensor):
        (xt,) = ctx.saved_tensors
        signs, cand_idx = ctx.signs, ctx.cand_idx
        gx = g @ signs.to(g.dtype)  # (..., K)
        g_cand = None
        if ctx.layer.track_latent_grad:
            gw = g.reshape(-1, g.shape[-1]).T @ xt.reshape(-1, xt.shape[-1])  # (out, K)
            ctx.layer._record_latent_grad(gw)
            g_cand = gw.reshape(-1)[cand_idx].float()
        return gx, g_cand, None, None, None


class LiftLinear(nn.Module):
    """Trainable LiftQuant linear layer (calibration form); see the module docstring."""

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        *,
        spec: LatticeSpec | str,
        init: str = "hadamard",
        proxy_bits: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = LatticeSpec.parse(spec)
        self.out_features, self.in_features = weight.shape
        # The frozen FP weight keeps its dtype (bf16 models stay bf16: half the memory); every
        # trained tensor is a float32 master copy.
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.whiten = KronWhitening(self.in_features, self.spec.target_dim, init=init)
        self.block_rule = self.whiten.block_rule
        bits = proxy_bits or max(1, math.floor(self.spec.bits_per_weight))
        self.proxy = UniformProxy(self.out_features, bits=bits)
        self.mode = "proxy"
        # Stage 1: recompute the proxy weight in backward instead of keeping its graph
        # (set by the block memory plan); stage 2: whether latent gradients are formed.
        self.checkpoint_proxy = False
        # Stage 1: form the proxy weight through torch.compile (``--compile_proxy``).
        self.compile_proxy = False
        # Stage 1: a proxy weight formed for this call by a batch of same-shape layers
        # (core.proxy_batch.supplied_proxy_weights sets it around one MoE experts forward).
        self.step_weight: Tensor | None = None
        # Stage 1: this step's Cayley factors (P1, P2), solved in one batch with the block's
        # other layers (supplied_factors); None: solved by this layer.
        self.step_factors: tuple[Tensor, Tensor] | None = None
        self.track_latent_grad = True
        self.accumulate_latent_grad = False
        # Stage 2: keep the signs also in the compute dtype (set by the block memory plan), so
        # no forward or backward casts the int8 signs; refreshed with them.
        self.cache_signs = False
        self._signs_cast: Tensor | None = None
        self._latent_sq: Tensor | None = None
        self._latent_acc: Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, spec, **kwargs) -> LiftLinear:
        return cls(linear.weight, linear.bias, spec=spec, **kwargs)

    # ---------------------------------------------------------------------------- stage 1
    def set_s1(self, s1: Tensor) -> None:
        self.whiten.set_s1(s1)

    def proxy_weight(self, factors: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``T^-1(Q(W T))`` (out, n): the weight as the proxy quantizer sees it.

        Always float32, also under autocast: the weight-space transform costs O(n (n1 + n2))
        per row, small next to the activation matmul, and the STE rounding of the proxy must
        see the same values as the float32 reference (bf16 moves values across levels).
        ``factors``: the Cayley factors ``(P1, P2)`` when already formed (default: solved here).
        """
        with torch.autocast(self.weight.device.type, enabled=False):
            W = self.weight.float()
            f = factors if factors is not None else self.whiten.factors()  # one solve each
            return self.whiten.inverse_weight(self.proxy(self.whiten.forward_weight(W, factors=f)),
                                              factors=f)

    def _proxy_weight_for_step(self) -> Tensor:
        f = self.step_factors
        # Compiled only where a gradient is taken: under no_grad (holdout, validation) a compiled
        # proxy would build a second, inference graph per shape for one forward; eager gives the
        # same values.
        compiled = self.compile_proxy and torch.is_grad_enabled()
        form = _compiled_proxy_weight() if compiled else LiftLinear.proxy_weight
        fn = lambda: form(self, f)
        if self.checkpoint_proxy and torch.is_grad_enabled():
            return checkpoint(fn, use_reentrant=False)
        return fn()

    def stage1_parameters(self) -> dict[str, list[nn.Parameter]]:
        w = self.whiten
        return {
            "transform": [p for p in (w.P1_skew, w.P2_skew) if p.requires_grad],
            "s1s2": [p for p in (w.s1, w.s2) if p.requires_grad],
            "clip": [self.proxy.clip],
        }

    # ---------------------------------------------------------------------------- rounding
    @torch.no_grad()
    def lattice_chunks(self) -> tuple[Tensor, Tensor]:
        """Whitened, row-RMS-normalised weight cut into d-chunks for the search.

        Returns ``Z`` (out * n_pad / d, d) float32 and the whitened rows ``W_t`` (out, n_pad).
        """
        if self.mode != "proxy":
            raise RuntimeError("round_to_lattice() called twice")
        W_t = self.whiten.forward_weight(self.weight.float())  # (out, n_pad)
        rms = W_t.square().mean(dim=1).sqrt().clamp_min(RMS_FLOOR)  # (out,)
        return (W_t / rms[:, None]).reshape(-1, self.spec.target_dim), W_t

    @torch.no_grad()
    def set_codes(self, codes: Tensor, cand_idx: Tensor, cand_pre: Tensor, M: Tensor,
                  *, W_t: Tensor | None = None) -> dict[str, float]:
        """Switch to lattice mode with ``codes`` (out * n_pad / d, D) int8 +-1 from the search.

        ``cand_idx`` are flat indices into the (out, K) code matrix of the flip candidates and
        ``cand_pre`` their initial latent values (signs agree with ``codes``). Per-row scales are
        the least-squares fit of the decoded rows to the whitened rows.
        """
        d, D = self.spec.target_dim, self.spec.lifted_dim
        if tuple(M.shape) != (d, D):
            raise ValueError(f"lattice M has shape {tuple(M.shape)}, expected ({d}, {D})")
        M = M.to(self.whiten.s1.device, torch.float32)
        if W_t is None:
            W_t = self.whiten.forward_weight(self.weight.float())
        dec = decode(codes, M).reshape(W_t.shape)  # (out, n_pad): M y per chunk, unscaled
        scale = (W_t * dec).sum(1) / dec.square().sum(1).clamp_min(RMS_FLOOR)  # LS per row
        rel_err = float((W_t - scale[:, None] * dec).square().sum() / W_t.square().sum())
        del dec
        L, R, s2_act = self.whiten.fused_factors(M)
        self.s1 = nn.Parameter(self.whiten.s1.detach().clone())
        self.L = nn.Parameter(L.detach().clone())
        self.R = nn.Parameter(R.detach().clone())
        self.s2_act = nn.Parameter(s2_act.detach().clone())
        self.register_buffer("signs", codes.reshape(self.out_features, -1).to(torch.int8))
        self.register_buffer("cand_idx", cand_idx.to(self.signs.device, torch.int64))
        self.cand = nn.Parameter(cand_pre.to(self.signs.device, torch.float32))
        # scale = scale_base * scale_gain: the learnable part is a relative gain, so one
        # learning rate suits rows of any magnitude (Adam steps are absolute).
        self.register_buffer("scale_base", scale.float())
        self.scale_gain = nn.Parameter(torch.ones_like(scale, dtype=torch.float32))
        del self.whiten, self.proxy
        self.weight = None  # the FP weight is no longer needed
        self.mode = "lattice"
        return {"rel_weight_err": rel_err, "candidates": int(cand_idx.numel())}

    @torch.no_grad()
    def round_to_lattice(self, M: Tensor, *, method: str = "auto",
                         margin: float = math.inf) -> dict[str, float]:
        """Encode the whitened rows on the lattice ``M`` (d, D) and switch to lattice mode.

        Latent weights with ``|pre| <= margin`` become trainable flip candidates (default: all).
        Returns statistics: relative weight-space error of the whitened rows.
        """
        Z, W_t = self.lattice_chunks()
        codes, idx, pre = encode_candidates(Z, M.to(Z.device, torch.float32), method=method,
                                            margin=margin)
        return self.set_codes(codes, idx, pre, M, W_t=W_t)

    def stage2_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"weight": [self.cand], "scale": [self.scale_gain], "transform": [self.L, self.R],
                "s1s2": [self.s1, self.s2_act]}

    @torch.no_grad()
    def refresh_signs(self) -> None:
        """Write the candidates' current signs into ``signs`` (0 counts as +1)."""
        if self.cand_idx.numel():
            new = torch.where(self.cand >= 0, 1, -1).to(torch.int8)
            self.signs.view(-1)[self.cand_idx] = new
            if self._signs_cast is not None:
                self._signs_cast.view(-1)[self.cand_idx] = new.to(self._signs_cast.dtype)

    def _matmul_signs(self, dtype: torch.dtype) -> Tensor:
        """The current signs for a product in ``dtype``: the cached copy with ``cache_signs``
        (built on first use, exact: +-1), else the int8 signs (cast by the product)."""
        if not self.cache_signs:
            self._signs_cast = None
            return self.signs
        if self._signs_cast is None or self._signs_cast.dtype != dtype:
            self._signs_cast = None
            self._signs_cast = self.signs.to(dtype)
        return self._signs_cast

    def _record_latent_grad(self, gw: Tensor) -> None:
        if self.accumulate_latent_grad:  # micro-batches: the norm is of the summed gradient
            gw = gw.float()
            self._latent_acc = gw if self._latent_acc is None else self._latent_acc.add_(gw)
            return
        if gw.dtype in (torch.bfloat16, torch.float16):  # one reduction, float32 inside
            sq = torch.linalg.vector_norm(gw, dtype=torch.float32).square()
        else:
            sq = sum(gw[r:r + LATENT_NORM_ROWS].float().square().sum()
                     for r in range(0, gw.shape[0], LATENT_NORM_ROWS))
        self._latent_sq = sq if self._latent_sq is None else self._latent_sq + sq

    def pop_latent_sqnorm(self) -> Tensor | None:
        """Squared norm of this step's dense latent gradient (all of out x K), then reset."""
        sq, acc = self._latent_sq, self._latent_acc
        self._latent_sq = self._latent_acc = None
        if acc is not None:
            return acc.square().sum()
        return sq

    @property
    def scale(self) -> Tensor:
        return self.scale_base * self.scale_gain

    def fused_input(self, x: Tensor) -> Tensor:
        d, D = self.spec.target_dim, self.spec.lifted_dim
        return apply_fused(x, s1=self.s1, L=self.L, R=self.R, s2_act=self.s2_act, d=d, D=D)

    # ---------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """Proxy (stage 1) or lattice (stage 2) output. Under autocast the matmuls run in the
        autocast dtype; otherwise the input is promoted to float32."""
        dtype = x.dtype
        if not torch.is_autocast_enabled(x.device.type):
            x = x.float()
        if self.mode == "proxy":
            w = self.step_weight if self.step_weight is not None else self._proxy_weight_for_step()
            out = F.linear(x, w, self.bias)
        else:
            self.refresh_signs()
            xt = self.fused_input(x)  # (..., K)
            out = _CandidateSignMatmul.apply(xt, self.cand, self._matmul_signs(xt.dtype),
                                             self.cand_idx, self)
            out = out * self.scale.to(out.dtype)
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
        return out.to(dtype)

    @torch.no_grad()
    def pack(self, *, dtype: torch.dtype = SIDE_DTYPE) -> PackedLiftLinear:
        """Freeze into the inference form (bit-packed signs, side tensors in ``dtype``)."""
        if self.mode != "lattice":
            raise RuntimeError("pack() needs round_to_lattice() first")
        layer = PackedLiftLinear(self.in_features, self.out_features, spec=self.spec,
                                 bias=self.bias is not None, side_dtype=dtype,
                                 device=self.signs.device, block_rule=self.block_rule)
        self.refresh_signs()
        layer.packed_signs.copy_(pack_signs(self.signs > 0))
        layer.scale.copy_(self.scale)
        layer.s1.copy_(self.s1)
        layer.L.copy_(self.L)
        layer.R.copy_(self.R)
        layer.s2_act.copy_(self.s2_act.reshape(layer.s2_act.shape))
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"lattice={self.spec.name} ({self.spec.bits_per_weight:.2f} bpw), mode={self.mode}")


class PackedLiftLinear(nn.Module):
    """Inference form: ``o = scale * (unpack(packed_signs) @ T*(x)) + bias`` (buffers only)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        spec: LatticeSpec | str,
        bias: bool = False,
        side_dtype: torch.dtype = SIDE_DTYPE,
        device: torch.device | str | None = None,
        block_rule: str = DEFAULT_BLOCK_SHAPE_RULE,
    ) -> None:
        super().__init__()
        self.spec = LatticeSpec.parse(spec)
        self.in_features, self.out_features = in_features, out_features
        d, D = self.spec.target_dim, self.spec.lifted_dim
        self.block_rule = block_rule  # whiten.block_shape rule (the checkpoint's, when loaded)
        n1, n2 = block_shape(in_features, d, block_rule)
        self.block_shape = (n1, n2)
        self.lifted_width = n1 * (n2 // d) * D
        kw = {"device": device}
        self.register_buffer("packed_signs", torch.zeros(
            out_features, packed_width(self.lifted_width), dtype=torch.uint8, **kw))
        self.register_buffer("scale", torch.ones(out_features, dtype=side_dtype, **kw))
        self.register_buffer("s1", torch.ones(in_features, dtype=side_dtype, **kw))
        self.register_buffer("L", torch.eye(n1, dtype=side_dtype, **kw))
        self.register_buffer("R", torch.zeros(n2, (n2 // d) * D, dtype=side_dtype, **kw))
        self.register_buffer("s2_act", torch.ones(n1, n2 // d, 1, dtype=side_dtype, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=side_dtype, **kw)
                             if bias else None)
        self.backend = "auto"  # kernel backend name (kernels.registry.set_backend)
        self.kernel_policy = None  # its KernelPolicy (None: the process policy)
        self.dense_weight = None  # dense decoded weight cache (kernels.dense), not saved

    def fused_input(self, x: Tensor) -> Tensor:
        d, D = self.spec.target_dim, self.spec.lifted_dim
        dt = x.dtype
        return apply_fused(x, s1=self.s1.to(dt), L=self.L.to(dt), R=self.R.to(dt),
                           s2_act=self.s2_act.to(dt), d=d, D=D)

    def signs(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Unpacked codes (out, K) of +-1."""
        return unpack_signs(self.packed_signs, self.lifted_width, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        # The "torch" backend (kernels.torch_ref.linear) is the reference decode; the backend
        # asks the planner (kernels.policy.plan) which path this call takes.
        return layer_backend(self, x.device).linear(self, x)

    @torch.no_grad()
    def dequantize_weight(self) -> Tensor:
        """Dense equivalent weight (out, in) in float32: ``W x == forward(x) - bias``."""
        eye = torch.eye(self.in_features, device=self.packed_signs.device)
        return ((self.fused_input(eye) @ self.signs().T) * self.scale.float()).T

    def storage_bits(self) -> dict[str, int]:
        """Bits this layer stores at inference: codes and every side tensor."""
        side = sum(t.numel() * t.element_size() * 8 for t in
                   (self.scale, self.s1, self.L, self.R, self.s2_act) + (
                       (self.bias,) if self.bias is not None else ()))
        return {"code_bits": self.out_features * self.lifted_width, "side_bits": side,
                "weights": self.out_features * self.in_features}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"lattice={self.spec.name} ({self.spec.bits_per_weight:.2f} bpw), "
                f"block_shape={self.block_shape}, bias={self.bias is not None}")


def cast_unquantized(block: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating tensor outside PackedLiftLinear layers to ``dtype`` (side tensors of
    packed layers keep their storage dtype)."""
    for module in block.modules():
        if isinstance(module, PackedLiftLinear):
            continue
        for key, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None and t.is_floating_point() and t.dtype != dtype:
                t.data = t.data.to(dtype)


@contextlib.contextmanager
def supplied_factors(layers: list[LiftLinear]) -> Iterator[None]:
    """For the body of the ``with``: the stage-1 ``layers`` take their Cayley factors from one
    batched solve per factor size (:func:`~liftquant.core.whiten.batched_factors`) instead of
    two solves each; cleared on exit. Layers not in proxy mode are left alone."""
    active = [m for m in layers if m.mode == "proxy"]
    try:
        factors = batched_factors([m.whiten for m in active]) if active else []
        for layer, f in zip(active, factors, strict=True):
            layer.step_factors = f
        yield
    finally:
        for layer in active:
            layer.step_factors = None
