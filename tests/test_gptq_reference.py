"""liftquant.quantize.baselines GPTQ against a textbook GPTQ written here from the paper alone.

Reference: Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1. Nothing below imports the quantizer's helpers: the grid,
RTN and the GPTQ loop are re-derived in float64 so that a shared mistake cannot hide.

    H = 2 X^T X                      (X: n x d_in calibration inputs of the layer)
    act-order: columns sorted by decreasing H_ii (dead inputs, H_ii = 0, last)
    dead inputs: H_ii = 1, W[:, i] = 0
    H += damp * mean(diag H) * I;    U = upper Cholesky factor of H^-1 (U^T U = H^-1)
    for every column j (in quantization order):
        at a group start: scale/zero from the min-max of columns [j, j + g) as updated so far
        q_j = quant(w_j);  e = (w_j - q_j) / U_jj;  w_k -= e * U_jk for all k > j

The grid is the asymmetric min-max one the toolkit stores (range widened to contain 0, scale
kept in float16, integer zero): ``s = fp16((max - min) / (2^b - 1))``, ``z = round(-min / s)``,
``q = clamp(round(w / s) + z, 0, 2^b - 1)``, ``w_hat = s (q - z)``. Our GPTQ (float32, lazy
batches of ``block_size`` columns) must give the same codes; where float32 vs float64 could flip
a rounding tie the tolerance is stated at the assertion.
"""

from __future__ import annotations

import math

import pytest
import torch

from liftquant.quantize import baselines

torch.set_num_threads(1)

# Share of codes allowed to differ between our float32 GPTQ and the float64 reference: a code
# that lands within ~1e-6 of a rounding boundary can flip and its error feedback then moves a
# few later codes. In practice the match is exact; this bounds it well below any real bug
# (a wrong group boundary or a stale column changes ~10% of codes or more).
CODE_MISMATCH_TOL = 2e-3
# Relative difference of the output error ||X W^T - X W_hat^T||^2 allowed for the same reason.
OUTPUT_ERR_RTOL = 1e-3


def _layer(*, n=2048, d_in=256, d_out=48, rank=12, seed=0, dead=()):
    """Random weight and strongly correlated inputs (low rank + noise, channel scales 0.1-10)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, d_in, dtype=torch.float64)[torch.randperm(d_in, generator=g)]
    Z = torch.randn(n, rank, generator=g, dtype=torch.float64)
    A = torch.randn(rank, d_in, generator=g, dtype=torch.float64)
    X = (Z @ A + 0.1 * torch.randn(n, d_in, generator=g, dtype=torch.float64)) * scales
    X[:, list(dead)] = 0.0
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return X, W


# ------------------------------------------------------------------------ textbook version
def _grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale (float16 value) and integer zero per row of w (rows, k)."""
    maxq = 2**bits - 1
    lo = torch.minimum(w.min(dim=1).values, torch.zeros(()))
    hi = torch.maximum(w.max(dim=1).values, torch.zeros(()))
    s = ((hi - lo) / maxq).clamp_min(1e-6).to(torch.float16).to(torch.float64)
    z = torch.clamp(torch.round(-lo / s), 0, maxq)
    return s, z


def _codes(w, s, z, bits):
    return torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1)


def textbook_rtn(W, *, bits, group_size):
    """Round-to-nearest per row and group; returns (codes, dequantized W)."""
    d_in = W.shape[1]
    gs = group_size or d_in
    codes, W_hat = torch.zeros_like(W), torch.zeros_like(W)
    for g0 in range(0, d_in, gs):
        cols = slice(g0, min(g0 + gs, d_in))
        s, z = _grid(W[:, cols], bits)
        codes[:, cols] = _codes(W[:, cols], s[:, None], z[:, None], bits)
        W_hat[:, cols] = s[:, None] * (codes[:, cols] - z[:, None])
    return codes, W_hat


def textbook_gptq(W, X, *, bits, group_size, damp=0.01, act_order=False):
    """Algorithm 1 of the paper without lazy batching (every later column updated at once).

    Returns (codes, dequantized W, group of every input column), all in the original order.
    """
    W = W.clone()
    d_in = W.shape[1]
    H = 2.0 * X.T @ X
    order = (torch.sort(H.diagonal(), descending=True, stable=True).indices if act_order
             else torch.arange(d_in))  # dead inputs (H_ii = 0) last
    dead = torch.nonzero(H.diagonal() == 0).flatten()
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    W, H = W[:, order], H[order][:, order]
    H = H + damp * H.diagonal().mean() * torch.eye(d_in, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    gs = group_size or d_in
    codes, W_hat = torch.zeros_like(W), torch.zeros_like(W)
    for j in range(d_in):
        if j % gs == 0:
            s, z = _grid(W[:, j:j + gs], bits)
        codes[:, j] = _codes(W[:, j], s, z, bits)
        W_hat[:, j] = s * (codes[:, j] - z)
        e = (W[:, j] - W_hat[:, j]) / U[j, j]
        W[:, j:] -= e[:, None] * U[j, j:][None, :]
    back = torch.argsort(order)
    group = torch.arange(d_in) // gs
    return codes[:, back], W_hat[:, back], group[back]


def _out_err(X, W, W_hat):
    return float((X @ (W - W_hat).T).square().sum())


def _ours(W, X, **kw):
    H = (X.T @ X / X.shape[0]).float()  # the pipeline's normalisation; GPTQ is scale-invariant
    return baselines.gptq_quantize(W.float(), H, **kw)


def _check_same(qw, ref_codes, ref_W_hat, X, W):
    mismatch = float((qw.codes.double() != ref_codes).double().mean())
    assert mismatch <= CODE_MISMATCH_TOL, f"{mismatch:.2%} of codes differ from the reference"
    ours, ref = _out_err(X, W, qw.dequantize().double()), _out_err(X, W, ref_W_hat)
    assert abs(ours - ref) <= OUTPUT_ERR_RTOL * ref, (ours, ref)
    return ours, ref


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("bits,group_size,block_size", [
    (4, 64, 128),   # groups inside a lazy batch
    (3, 128, 128),  # group = lazy batch (the recorded demo setting, g128)
    (4, 48, 32),    # group starts inside a lazy batch and spills over its end
    (2, 0, 64),     # per-channel: one group spans every lazy batch
    (4, 0, 256),    # per-channel, one lazy batch
])
def test_gptq_matches_textbook(bits, group_size, block_size):
    X, W = _layer(seed=bits * 7 + group_size)
    ref_codes, ref_W_hat, _ = textbook_gptq(W, X, bits=bits, group_size=group_size)
    qw = _ours(W, X, bits=bits, group_size=group_size, block_size=block_size)
    ours, _ = _check_same(qw, ref_codes, ref_W_hat, X, W)
    _, rtn_W_hat = textbook_rtn(W, bits=bits, group_size=group_size)
    assert ours < 0.7 * _out_err(X, W, rtn_W_hat)  # error feedback pays off on correlated X


@pytest.mark.parametrize("group_size,block_size", [(32, 128), (48, 32), (0, 64)])
def test_gptq_act_order_matches_textbook(group_size, block_size):
    X, W = _layer(seed=11 + group_size, dead=(5, 77))
    ref_codes, ref_W_hat, ref_group = textbook_gptq(W, X, bits=3, group_size=group_size,
                                                    act_order=True)
    qw = _ours(W, X, bits=3, group_size=group_size, act_order=True, block_size=block_size)
    ours, _ = _check_same(qw, ref_codes, ref_W_hat, X, W)
    if group_size:  # groups follow the quantization order, so each column carries its group
        assert qw.g_idx is not None and torch.equal(qw.g_idx.long(), ref_group)
        assert torch.bincount(qw.g_idx.long()).tolist() == [group_size] * (256 // group_size) + (
            [256 % group_size] if 256 % group_size else [])
    else:
        assert qw.g_idx is None
    assert torch.all(qw.dequantize()[:, [5, 77]] == 0)  # dead inputs get zero weights
    _, rtn_W_hat = textbook_rtn(W, bits=3, group_size=group_size)
    assert ours < 0.7 * _out_err(X, W, rtn_W_hat)


def test_rtn_matches_textbook():
    _, W = _layer(d_in=200, seed=3)  # 200 = 3 x 64 + 8: a short last group
    for bits, gs in ((2, 64), (4, 0), (3, 64)):
        ref_codes, ref_W_hat = textbook_rtn(W, bits=bits, group_size=gs)
        qw = baselines.rtn_quantize(W.float(), bits=bits, group_size=gs)
        assert torch.equal(qw.codes.double(), ref_codes)
        assert torch.allclose(qw.dequantize().double(), ref_W_hat, rtol=0, atol=1e-5)
        assert qw.scales.shape == (W.shape[0], math.ceil(200 / (gs or 200)))


def test_gptq_is_rtn_without_correlation_and_beats_it_with():
    """White inputs leave no error to spread (GPTQ = RTN); correlated ones are where it wins."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(32, 128, generator=g, dtype=torch.float64)
    H_white = torch.eye(128)  # the limit of X^T X / n for white X
    qw = baselines.gptq_quantize(W.float(), H_white, bits=3, group_size=64)
    assert torch.equal(qw.codes.double(), textbook_rtn(W, bits=3, group_size=64)[0])
    X, W = _layer(seed=9)
    for gs in (0, 64):
        gptq = _out_err(X, W, _ours(W, X, bits=4, group_size=gs).dequantize().double())
        rtn = _out_err(X, W, textbook_rtn(W, bits=4, group_size=gs)[1])
        assert gptq < 0.7 * rtn
