"""Perplexity of a causal language model (replaces the official ``main.evaluate``).

Convention (GPTQ, IST-DASLab/gptq ``llama_eval``; also AQLM ``perplexity_eval``): the joined
evaluation text is cut into non-overlapping windows of ``seq_len`` tokens, the trailing
partial window is dropped, each window is scored independently (no context carried over),
and perplexity = exp(mean next-token negative log-likelihood over all predicted tokens of all
windows), i.e. ``seq_len - 1`` predictions per window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from liftquant.util.log import get_logger, timer

logger = get_logger("eval")

DEFAULT_SEQ_LEN = 2048  # GPTQ / OmniQuant / paper convention
# Rows of logits upcast to float32 at a time: bounds the loss's extra memory to
# LOSS_CHUNK_TOKENS * vocab * 4 B (about 0.6 GB for Qwen's 152k vocabulary).
LOSS_CHUNK_TOKENS = 1024


def _input_device(model: torch.nn.Module) -> torch.device:
    """Where input ids must go: the device of the input embeddings (works with device maps)."""
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def _windows(ids: torch.Tensor, *, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """(1, T) or (T,) ids -> (n_windows, seq_len); the trailing partial window is dropped."""
    flat = ids.reshape(-1) if ids.dim() == 1 or ids.shape[0] == 1 else None
    if flat is None:
        raise ValueError(f"ids must have shape (1, T) or (T,), got {tuple(ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    n_windows = flat.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"{flat.numel()} tokens make no full window of seq_len={seq_len}")
    return flat[: n_windows * seq_len].view(n_windows, seq_len)  # (n_windows, seq_len)


def sum_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL in float64 for logits (..., V) and targets (...), shapes aligned.

    The loss is computed in float32 (log-softmax inside ``cross_entropy``) over chunks of
    ``LOSS_CHUNK_TOKENS`` rows so that bf16 logits of a large vocabulary are never upcast whole.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (N, V)
    flat_targets = targets.reshape(-1).to(flat_logits.device)  # (N,)
    total = torch.zeros((), dtype=torch.float64, device=flat_logits.device)
    for start in range(0, flat_targets.numel(), LOSS_CHUNK_TOKENS):
        rows = slice(start, start + LOSS_CHUNK_TOKENS)
        chunk = F.cross_entropy(flat_logits[rows].float(), flat_targets[rows], reduction="sum")
        total += chunk.double()
    return total


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    max_windows: int | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``ids`` (1, T) with non-overlapping ``seq_len`` windows.

    Works with any Hugging Face causal LM (``model(input_ids).logits``). ``device`` is where
    the input ids are sent (default: the device of the model's input embeddings); the model is
    not moved. ``max_windows`` limits the evaluation to the first windows (quick checks). The
    model is put in eval mode and its training flag restored afterwards.
    """
    windows = _windows(ids, seq_len=seq_len, max_windows=max_windows)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    target_device = torch.device(device) if device is not None else _input_device(model)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        with timer() as t:
            starts = range(0, windows.shape[0], batch_size)
            for start in tqdm(starts, desc="perplexity", leave=False, disable=not progress):
                batch = windows[start:start + batch_size].to(target_device)  # (b, seq_len)
                logits = model(batch, use_cache=False).logits  # (b, seq_len, V)
                nll += sum_nll(logits[:, :-1], batch[:, 1:]).item()
                count += batch.shape[0] * (seq_len - 1)
    finally:
        model.train(was_training)
    ppl = math.exp(nll / count)
    logger.info("perplexity %.4f over %d windows x %d tokens (%.1f s)", ppl, windows.shape[0],
                seq_len, t["seconds"])
    return ppl
