"""The two layer forms of LiftQuant (paper Eqs. 2-5).

``LiftLinear`` is the differentiable calibration form of one ``nn.Linear``:

* mode ``"proxy"`` (stage 1): ``W_eff = T^-1( Q_uniform( W T ) )`` with the learnable whitening
  ``T`` (:class:`~liftquant.whiten.KronWhitening`) and the STE proxy quantizer (Eq. 3);
* :meth:`LiftLinear.round_to_lattice` whitens the rows, normalises them by their RMS, encodes
  every d-chunk to its nearest lattice code (``lattice.encode``) and switches to
* mode ``"lattice"`` (stage 2, intra-block correction, Eq. 5): ``o = s * (sign(V) @ T*(x))``
  where ``V`` are latent weights (sign with straight-through gradient), ``s`` per-row scales and
  ``T*`` the fused transform (``s1``, ``L``, ``R``, ``s2_act``; Eq. 4), all trainable.

``PackedLiftLinear`` is the buffers-only inference form, built from shapes alone, so loading a
checkpoint is "skeleton -> swap -> load_state_dict(strict=True)".

Legend: ``n`` in_features, ``out`` out_features, ``(n1, n2)`` = ``whiten.block_shape(n, d)``,
``K = n1 * (n2 / d) * D`` the lifted width (bits per row), ``s`` per-row scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liftquant.kernels.registry import get_backend
from liftquant.lattice import LatticeSpec, decode, encode
from liftquant.pack import pack_signs, packed_width, unpack_signs
from liftquant.proxy import UniformProxy
from liftquant.whiten import DEFAULT_BLOCK_SHAPE_RULE, KronWhitening, apply_fused, block_shape

# Row RMS floor before normalisation (all-zero rows stay zero instead of producing NaN).
RMS_FLOOR = 1e-8
# Side tensors (scales, s1, s2, fused factors) are stored in this dtype in packed layers.
SIDE_DTYPE = torch.float16


def lifted_width(in_features: int, spec: LatticeSpec,
                 rule: str = DEFAULT_BLOCK_SHAPE_RULE) -> int:
    """Number of sign bits per output row: ``K = n1 * (n2 / d) * D``."""
    n1, n2 = block_shape(in_features, spec.target_dim, rule)
    return n1 * (n2 // spec.target_dim) * spec.lifted_dim


def ste_sign(v: Tensor) -> Tensor:
    """``sign(v)`` (0 -> +1) in the forward pass, identity gradient in the backward pass."""
    return v + (torch.where(v >= 0, 1.0, -1.0).to(v.dtype) - v).detach()


class LiftLinear(nn.Module):
    """Trainable LiftQuant linear layer (calibration form); see the module docstring."""

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        *,
        spec: "LatticeSpec | str",
        init: str = "hadamard",
        proxy_bits: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = LatticeSpec.parse(spec)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.whiten = KronWhitening(self.in_features, self.spec.target_dim, init=init)
        self.block_rule = self.whiten.block_rule
        bits = proxy_bits or max(1, math.floor(self.spec.bits_per_weight))
        self.proxy = UniformProxy(self.out_features, bits=bits)
        self.mode = "proxy"

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, spec, **kwargs) -> "LiftLinear":
        return cls(linear.weight, linear.bias, spec=spec, **kwargs)

    # ---------------------------------------------------------------------------- stage 1
    def set_s1(self, s1: Tensor) -> None:
        self.whiten.set_s1(s1)

    def proxy_weight(self) -> Tensor:
        """``T^-1(Q(W T))`` (out, n): the weight as the proxy quantizer sees it."""
        return self.whiten.inverse_weight(self.proxy(self.whiten.forward_weight(self.weight)))

    def stage1_parameters(self) -> dict[str, list[nn.Parameter]]:
        w = self.whiten
        return {
            "transform": [p for p in (w.P1_skew, w.P2_skew) if p.requires_grad],
            "s1s2": [p for p in (w.s1, w.s2) if p.requires_grad],
            "clip": [self.proxy.clip],
        }

    # ---------------------------------------------------------------------------- rounding
    @torch.no_grad()
    def round_to_lattice(self, M: Tensor, *, method: str = "auto") -> dict[str, float]:
        """Encode the whitened rows on the lattice ``M`` (d, D) and switch to lattice mode.

        Returns statistics: relative weight-space error of the whitened rows.
        """
        if self.mode != "proxy":
            raise RuntimeError("round_to_lattice() called twice")
        d, D = self.spec.target_dim, self.spec.lifted_dim
        if tuple(M.shape) != (d, D):
            raise ValueError(f"lattice M has shape {tuple(M.shape)}, expected ({d}, {D})")
        M = M.to(self.weight.device, torch.float32)
        W_t = self.whiten.forward_weight(self.weight)  # (out, n_pad)
        rms = W_t.square().mean(dim=1).sqrt().clamp_min(RMS_FLOOR)  # (out,)
        Z = (W_t / rms[:, None]).reshape(-1, d)  # (out * n_pad / d, d)
        codes, pre = encode(Z, M, method=method, return_pre_sign=True)
        dec = decode(codes, M).reshape(W_t.shape)  # (out, n_pad): M y per chunk, unscaled
        scale = (W_t * dec).sum(1) / dec.square().sum(1).clamp_min(RMS_FLOOR)  # LS per row
        rel_err = float((W_t - scale[:, None] * dec).square().sum() / W_t.square().sum())
        L, R, s2_act = self.whiten.fused_factors(M)
        self.s1 = nn.Parameter(self.whiten.s1.detach().clone())
        self.L = nn.Parameter(L.detach().clone())
        self.R = nn.Parameter(R.detach().clone())
        self.s2_act = nn.Parameter(s2_act.detach().clone())
        self.latent = nn.Parameter(pre.reshape(self.out_features, -1).float())  # (out, K)
        # scale = scale_base * scale_gain: the learnable part is a relative gain, so one
        # learning rate suits rows of any magnitude (Adam steps are absolute).
        self.register_buffer("scale_base", scale.float())
        self.scale_gain = nn.Parameter(torch.ones_like(scale, dtype=torch.float32))
        del self.whiten, self.proxy
        self.weight = None  # the FP weight is no longer needed
        self.mode = "lattice"
        return {"rel_weight_err": rel_err}

    def stage2_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"weight": [self.latent], "scale": [self.scale_gain], "transform": [self.L, self.R],
                "s1s2": [self.s1, self.s2_act]}

    @property
    def scale(self) -> Tensor:
        return self.scale_base * self.scale_gain

    def fused_input(self, x: Tensor) -> Tensor:
        d, D = self.spec.target_dim, self.spec.lifted_dim
        return apply_fused(x, s1=self.s1, L=self.L, R=self.R, s2_act=self.s2_act, d=d, D=D)

    # ---------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        if self.mode == "proxy":
            out = F.linear(x, self.proxy_weight(), self.bias)
        else:
            out = (self.fused_input(x) @ ste_sign(self.latent).T) * self.scale
            if self.bias is not None:
                out = out + self.bias
        return out.to(dtype)

    @torch.no_grad()
    def pack(self, *, dtype: torch.dtype = SIDE_DTYPE) -> "PackedLiftLinear":
        """Freeze into the inference form (bit-packed signs, side tensors in ``dtype``)."""
        if self.mode != "lattice":
            raise RuntimeError("pack() needs round_to_lattice() first")
        layer = PackedLiftLinear(self.in_features, self.out_features, spec=self.spec,
                                 bias=self.bias is not None, side_dtype=dtype,
                                 device=self.latent.device, block_rule=self.block_rule)
        layer.packed_signs.copy_(pack_signs(self.latent >= 0))
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
        spec: "LatticeSpec | str",
        bias: bool = False,
        side_dtype: torch.dtype = SIDE_DTYPE,
        device: "torch.device | str | None" = None,
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

    def fused_input(self, x: Tensor) -> Tensor:
        d, D = self.spec.target_dim, self.spec.lifted_dim
        dt = x.dtype
        return apply_fused(x, s1=self.s1.to(dt), L=self.L.to(dt), R=self.R.to(dt),
                           s2_act=self.s2_act.to(dt), d=d, D=D)

    def signs(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Unpacked codes (out, K) of +-1."""
        return unpack_signs(self.packed_signs, self.lifted_width, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        # The "torch" backend (kernels.torch_ref.linear) is the reference decode.
        return get_backend(self.backend, x.device).linear(self, x)

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
