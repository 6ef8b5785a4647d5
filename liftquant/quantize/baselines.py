"""Round-to-nearest and GPTQ baselines, run by the toolkit on the same model and data (SPEC §8):
the block loop over a model (:func:`quantize_baseline`), the ``--method rtn|gptq`` glue of a run
(:func:`config_from_run`, :func:`quantize_run`) and their registration in the method registry
(:mod:`liftquant.quantize.methods`). It owns no tensor math (the grid, RTN and per-layer GPTQ are
:mod:`liftquant.core.baseline_math`) and no checkpoint format (:mod:`liftquant.io.baseline_format`);
it may import those, the rest of :mod:`liftquant.io`, :mod:`liftquant.quantize` and the layers below.
Every name of the earlier single module is re-exported here, so
``from liftquant.quantize.baselines import X`` keeps working.

Both baselines quantize every linear of the adapter's groups (the LM head and embeddings stay in
full precision, exactly as for LiftQuant). For GPTQ the Hessian of a linear is
``H = sum_t c_t x_t x_t^T / n`` over its calibration inputs, where every token counts once
(``c_t = 1``) except the first token of each calibration window, which counts
``first_token_weight`` times (see below). Blocks are processed in order with true-sequential
groups: the Hessian of a group is collected with the block's earlier groups already quantized,
and the next block's inputs are the quantized block's outputs.

**Why the first token is weighted** (bench/quality/README.md, "GPTQ vs RTN"): the first position of
every window becomes an attention sink (SmolLM2: residual activations of ~10^3 there). GPTQ moves
rounding error into input directions that carry little calibration energy; the sink's
(normalised) input is such a direction, as it is 1 token in L. With ``c_t = 1`` its q/k/v error
ends up *larger* than round-to-nearest's in blocks 2-5 while every other token's shrinks,
and since every later query attends to the sink, the perplexity of textbook GPTQ at 4 bits fell
behind RTN's on SmolLM2 (numbers in that section). ``first_token_weight = 1`` is textbook GPTQ.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from liftquant.core.baseline_math import (  # noqa: F401 - re-exported from their old home
    BITS_RANGE,
    BLOCK_SIZE,
    DAMP_RETRIES,
    FIRST_TOKEN_WEIGHT,
    GIDX_BITS,
    METHODS,
    SCALE_BITS,
    SCALE_MIN,
    BaselineSpec,
    QuantizedWeight,
    _inverse_cholesky_upper,
    _pack_planes,
    _unpack_planes,
    gptq_quantize,
    minmax_params,
    quantize_codes,
    quantize_weight,
    rtn_quantize,
)
from liftquant.io.baseline_format import (  # noqa: F401 - re-exported from their old home
    FORMAT_VERSION,
    PACK_LAYOUT,
    QUANT_METHOD,
    checkpoint_tensors,
    load_baseline,
    quantization_config,
    read_quantization_config,
    storage_bits,
)
from liftquant.models.adapters import ModelAdapter
from liftquant.quantize.cache import ActivationCache
from liftquant.quantize.capture import capture_block_inputs, kwargs_for_block
from liftquant.quantize.methods import (  # noqa: F401 - load_checkpoint: re-exported from its old home
    QuantMethod,
    load_checkpoint,
    register_method,
)
from liftquant.quantize.stream import BlockStream, forward_block, index_batches
from liftquant.util.log import get_logger, peak_memory_gib

logger = get_logger("baselines")


# ------------------------------------------------------------------------------ model loop
class _StopBlock(Exception):
    """Raised by the Hessian hook: the rest of the block is not needed for this group."""


@torch.no_grad()
def _group_hessian(block: nn.Module, first: nn.Module, X: ActivationCache, block_kwargs: dict,
                   *, batch_size: int, device: torch.device,
                   first_token_weight: float = 1.0) -> Tensor:
    """``sum_t c_t x_t x_t^T / n`` over every calibration token of the input of ``first``
    (in, in), float32; ``c_t = first_token_weight`` at position 0 of each window, else 1."""
    H = torch.zeros(first.in_features, first.in_features, device=device)
    count = {"n": 0}

    def hook(_module, args):
        x = args[0].detach().float()  # (B, L, in)
        if first_token_weight != 1.0:
            x = x.clone()
            x[:, 0] *= math.sqrt(first_token_weight)
        x = x.reshape(-1, x.shape[-1])  # (B*L, in)
        H.addmm_(x.T, x)
        count["n"] += x.shape[0]
        raise _StopBlock

    handle = first.register_forward_pre_hook(hook)
    stream = BlockStream(block_kwargs, device=device, dtype=torch.float32)
    try:
        for idx, (x,) in stream.batches(index_batches(range(len(X)), batch_size), X):
            try:
                forward_block(block, x, stream.kwargs(len(idx)))
            except _StopBlock:
                continue
            raise RuntimeError("the block never called the linear being calibrated")
    finally:
        handle.remove()
        stream.close()
    return H / max(count["n"], 1)


@torch.no_grad()
def _propagate(block: nn.Module, X: ActivationCache, block_kwargs: dict, *, batch_size: int,
               device: torch.device) -> None:
    """Replace the block inputs in ``X`` by the (quantized) block's outputs, in place."""
    stream = BlockStream(block_kwargs, device=device, dtype=torch.float32)
    try:
        with stream.writer(X) as w:
            for idx, (x,) in stream.batches(index_batches(range(len(X)), batch_size), X):
                w.put(idx, forward_block(block, x, stream.kwargs(len(idx))))
    finally:
        stream.close()


def _set_weight(lin: nn.Module, qw: QuantizedWeight, dtype: torch.dtype) -> float:
    """Write the dequantized weight (rounded through the model dtype); return rel. weight error."""
    w_hat = qw.dequantize(dtype).to(lin.weight.device)
    rel = float((lin.weight.float() - w_hat.float()).square().sum()
                / lin.weight.float().square().sum().clamp_min(1e-30))
    lin.weight.data = w_hat.to(lin.weight.dtype)
    return rel


@torch.no_grad()
def quantize_baseline(model: nn.Module, calib_ids: Tensor | None, *, spec: BaselineSpec,
                      adapter: ModelAdapter, device: torch.device, batch_size: int = 1,
                      cache_mode: str = "cpu", cache_dir: str | None = None
                      ) -> tuple[dict[str, QuantizedWeight], list[dict]]:
    """Quantize the adapter's linears of every block in place (dense dequantized weights).

    Returns ``({module name: QuantizedWeight}, report rows)``. RTN ignores ``calib_ids``.
    """
    from tqdm.auto import tqdm

    from liftquant.models.moe import unfuse_experts

    unfuse_experts(model)  # MoE: every expert matrix is a linear the adapter names (as LiftQuant)
    blocks = adapter.get_blocks(model)
    model_dtype = next(model.parameters()).dtype
    X, block_kwargs = None, None
    if spec.method == "gptq":
        if calib_ids is None:
            raise ValueError("GPTQ needs calibration ids (N, L)")
        n, seq_len = calib_ids.shape
        X = ActivationCache(n, seq_len, model.config.get_text_config().hidden_size,
                            mode=cache_mode, path=cache_dir,
                            dtype=torch.float32 if model_dtype == torch.float32 else torch.bfloat16)
        block_kwargs = capture_block_inputs(model, adapter, calib_ids, cache=X,
                                            batch_size=batch_size, device=device)
    weights, rows = {}, []
    for i in tqdm(range(len(blocks)), desc=spec.name):
        t0 = time.time()
        block = blocks[i].to(device=device, dtype=torch.float32)
        errs = []
        for group in adapter.block_groups(block):
            H = None
            if X is not None:
                H = _group_hessian(block, adapter.get_linear(block, group[0]), X,
                                   kwargs_for_block(block_kwargs, i),
                                   batch_size=batch_size, device=device,
                                   first_token_weight=spec.first_token_weight)
            for name in group:
                lin = adapter.get_linear(block, name)
                qw = quantize_weight(lin.weight, spec, H)
                errs.append(_set_weight(lin, qw, model_dtype))
                weights[f"{adapter.blocks}.{i}.{name}"] = qw.cpu()
        if X is not None and i + 1 < len(blocks):
            _propagate(block, X, kwargs_for_block(block_kwargs, i), batch_size=batch_size,
                       device=device)
        blocks[i] = block.to(device="cpu", dtype=model_dtype)
        row = {"block": i, "weight_rel_err": sum(errs) / len(errs),
               "seconds": round(time.time() - t0, 2), "peak_gib": round(peak_memory_gib(device), 3)}
        logger.info("block %d/%d %s weight_rel_err %.4f %.1fs", i + 1, len(blocks), spec.name,
                    row["weight_rel_err"], row["seconds"])
        rows.append(row)
    if X is not None:
        X.close()
    return weights, rows


# ------------------------------------------------------------------- the method registry
def config_from_run(cfg, model=None, adapter=None) -> tuple[BaselineSpec, None, dict]:
    """(BaselineSpec, M = None, rate_info) of a ``--method rtn|gptq`` run config."""
    lat = cfg.lattice
    extra = {} if lat.first_token_weight is None else {"first_token_weight": lat.first_token_weight}
    spec = BaselineSpec(method=lat.method, bits=lat.baseline_bits, group_size=lat.group_size,
                        damp=lat.damp, act_order=cfg.train.act_order, **extra)
    return spec, None, {"rule": f"--method {lat.method}"}


def quantize_run(model: nn.Module, calib: Tensor | None, *, cfg, spec: BaselineSpec, adapter,
                 device: torch.device, **_run: Any) -> tuple[list, dict, dict, dict]:
    """RTN/GPTQ of a run: (report rows, bits report, quantization_config, packed tensors)."""
    from liftquant.io.checkpoint import bits_report

    weights, rows = quantize_baseline(
        model, calib, spec=spec, adapter=adapter, device=device, batch_size=cfg.calib.batch_size,
        cache_mode="cpu" if cfg.calib.cache_mode == "auto" else cfg.calib.cache_mode,
        cache_dir=cfg.calib.cache_dir)
    qc = quantization_config(spec, quantized_modules=list(weights),
                             not_converted=list(adapter.skip))
    bits = bits_report(model, quantized=storage_bits(model, weights))
    return rows, bits, qc, checkpoint_tensors(model, weights)


def _load(path: str | Path, *, device: torch.device | str = "cpu",
          dtype: torch.dtype | None = None, backend: str = "auto") -> tuple[nn.Module, Any]:
    return load_baseline(path, device=device, dtype=dtype)  # dense weights: no kernel backend


register_method(QuantMethod(
    quant_method=QUANT_METHOD, names=METHODS, config_type=BaselineSpec,
    make_config=config_from_run, quantize=quantize_run, quantization_config=quantization_config,
    load=_load, needs_calibration=lambda name: name != "rtn"))
