"""Capture the inputs of decoder block 0 and call a single block again on cached activations.

``capture_block_inputs`` runs the model's own forward (so masks and rotary embeddings are built
exactly as in inference) with a forward pre-hook on block 0 that stores the hidden states into
an :class:`~liftquant.quantize.cache.ActivationCache`, keeps the block's keyword arguments once, and
aborts the forward with a private :class:`StopForward`. Only ``adapter.pre_block`` modules
(embedding, rotary embedding) visit the accelerator; the blocks stay where they are.

``run_block`` calls one block on ``(B, L, H)`` activations with those keyword arguments, with
the batch dimension of per-sample tensors broadcast to ``B`` and floating tensors cast to the
activation dtype. It does not change the grad mode, so training code can backpropagate.

Hybrid models (``config.layer_types`` with more than one type, e.g. Qwen3.5's
"linear_attention" / "full_attention") hand different kwargs to different blocks (a causal mask
to attention blocks, a padding mask or None to linear-attention blocks). For them the capture
also records every block's kwargs once, by running the model's forward on the first batch with
the blocks swapped for recording stubs (no block computes), and returns a :class:`BlockKwargs`:
the dict is block 0's kwargs, :func:`kwargs_for_block` gives block i's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from liftquant.models.adapters import ModelAdapter
from liftquant.quantize.cache import ActivationCache
from liftquant.util.log import get_logger

logger = get_logger("capture")

HIDDEN_STATES_KWARG = "hidden_states"
#: Block keyword arguments that belong to incremental decoding, never to calibration.
DROPPED_KWARGS = frozenset(
    {
        "past_key_value",
        "past_key_values",
        "layer_past",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
    }
)
SLIDING_LAYER_TYPE = "sliding_attention"


class StopForward(Exception):
    """Raised by the capture hook to end the model's forward right after block 0's inputs."""


# ------------------------------------------------------------------------- tensor trees
def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in a nest of tuples/lists/dicts; keep the rest as is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple | list):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _is_cache_object(value: Any) -> bool:
    """transformers ``Cache`` instances (KV caches) are never part of the replayable kwargs."""
    return any(cls.__name__.endswith("Cache") for cls in type(value).__mro__[:-1])


def _collapse_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``(batch, ...)`` tensors whose rows are all equal become ``(1, ...)`` (e.g. eager masks)."""
    if t.ndim >= 2 and batch > 1 and t.shape[0] == batch and bool((t == t[:1]).all()):
        return t[:1].clone()
    return t


def _clean_block_kwargs(kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
    """Drop decoding-only entries and move tensors to CPU, collapsing identical batch rows."""
    clean = {}
    for key, value in kwargs.items():
        if key in DROPPED_KWARGS or key == HIDDEN_STATES_KWARG or _is_cache_object(value):
            continue
        clean[key] = _map_tensors(value, lambda t: _collapse_batch(t.detach().cpu(), batch))
    return clean


class BlockKwargs(dict):
    """Block 0's replay kwargs (the dict itself) plus those of blocks that get other kwargs.

    ``per_block`` maps a block index to its kwargs where they differ from block 0's (hybrid
    layer types); every other block replays the dict itself. Use :func:`kwargs_for_block`.
    """

    def __init__(self, base: dict[str, Any], per_block: dict[int, dict[str, Any]] | None = None):
        super().__init__(base)
        self.per_block = dict(per_block or {})

    def for_block(self, index: int) -> dict[str, Any]:
        return self.per_block.get(index, self)


def kwargs_for_block(block_kwargs: dict[str, Any], index: int) -> dict[str, Any]:
    """The replay kwargs of block ``index`` (``block_kwargs`` itself unless it is a
    :class:`BlockKwargs` with an entry for that block)."""
    if isinstance(block_kwargs, BlockKwargs):
        return block_kwargs.for_block(index)
    return block_kwargs


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _same_kwargs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)


def _is_hybrid(config: Any) -> bool:
    return len(set(getattr(_text_config(config), "layer_types", None) or ())) > 1


class _KwargsRecorder(nn.Module):
    """Stands in for a block during :func:`_record_block_kwargs`: keeps the kwargs, returns x."""

    def __init__(self, index: int, store: dict[int, dict[str, Any]], last: int) -> None:
        super().__init__()
        self.index, self.store, self.last = index, store, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TypeError("blocks are expected to take everything but hidden_states by keyword")
        self.store[self.index] = _clean_block_kwargs(kwargs, hidden_states.shape[0])
        if self.index == self.last:
            raise StopForward
        return hidden_states


def _record_block_kwargs(model: nn.Module, adapter: ModelAdapter,
                         batch: torch.Tensor) -> dict[int, dict[str, Any]]:
    """Every block's cleaned kwargs for one batch; the blocks are swapped for stubs meanwhile."""
    blocks = adapter.get_blocks(model)
    store: dict[int, dict[str, Any]] = {}
    originals = list(blocks)
    try:
        for i in range(len(blocks)):
            blocks[i] = _KwargsRecorder(i, store, len(blocks) - 1)
        try:
            model(input_ids=batch, use_cache=False)
        except StopForward:
            pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    if len(store) != len(blocks):
        raise RuntimeError(f"the forward pass reached {len(store)} of {len(blocks)} blocks "
                           "while recording their kwargs; check the adapter")
    return store


# ------------------------------------------------------------------------------ capture
def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(recurse=True), *module.buffers(recurse=True)):
        return tensor.device
    return torch.device("cpu")


def _text_config(config: Any) -> Any:
    """The language model's config (composite vision-language configs nest it)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _check_uniform_masks(config: Any, seq_len: int) -> None:
    """Block-0 kwargs replay for every block only if all blocks see the same attention mask."""
    config = _text_config(config)
    layer_types = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    if len(layer_types) > 1 and SLIDING_LAYER_TYPE in layer_types and window and seq_len > window:
        raise NotImplementedError(
            f"layers mix attention types {sorted(layer_types)} and seq_len {seq_len} exceeds the "
            f"sliding window {window}: block 0's attention mask does not fit every block. "
            f"Calibrate with seq_len <= {window}."
        )


def capture_block_inputs(
    model: nn.Module,
    adapter: ModelAdapter,
    input_ids: torch.Tensor,
    *,
    cache: ActivationCache,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Fill ``cache`` with the block-0 inputs for ``input_ids`` (N, L); return the block kwargs.

    The returned kwargs (attention mask, position embeddings (cos, sin), position ids, ...; CPU
    tensors, batch rows collapsed to 1 when identical) replay block 0 through :func:`run_block`,
    and block i with ``kwargs_for_block(kwargs, i)`` (the same dict unless layer types differ). ``adapter.pre_block`` modules are moved to ``device`` for the capture and
    back afterwards.
    """
    n, seq_len = input_ids.shape
    if (n, seq_len) != cache.shape[:2]:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} do not match cache {cache.shape}")
    _check_uniform_masks(getattr(model, "config", None), seq_len)
    device = torch.device(device)
    block0 = adapter.get_blocks(model)[0]
    state: dict[str, Any] = {"start": 0, "kwargs": None}

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs[HIDDEN_STATES_KWARG]
        start = state["start"]
        cache[start : start + hidden.shape[0]] = hidden
        if state["kwargs"] is None:
            state["kwargs"] = _clean_block_kwargs(kwargs, hidden.shape[0])
        raise StopForward

    moved = _move_pre_block(model, adapter, device)
    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                state["start"] = start
                batch = input_ids[start : start + batch_size].to(device)
                try:
                    model(input_ids=batch, use_cache=False)
                except StopForward:
                    continue
                raise RuntimeError("the forward pass never reached block 0; check the adapter")
        per_block = {}
        if _is_hybrid(getattr(model, "config", None)):
            with torch.no_grad():
                recorded = _record_block_kwargs(model, adapter, input_ids[:batch_size].to(device))
            per_block = {i: kw for i, kw in recorded.items()
                         if not _same_kwargs(kw, state["kwargs"])}
    finally:
        handle.remove()
        for module, original in moved:
            module.to(original)
    logger.debug("captured %d x %d block inputs; kwargs %s; blocks with their own kwargs %s",
                 n, seq_len, sorted(state["kwargs"]), sorted(per_block))
    return BlockKwargs(state["kwargs"], per_block)


def _move_pre_block(
    model: nn.Module, adapter: ModelAdapter, device: torch.device
) -> list[tuple[nn.Module, torch.device]]:
    """Move the pre-block modules to ``device``; return ``(module, original device)`` pairs."""
    moved = []
    for name in adapter.pre_block:
        module = adapter.get_module(model, name)
        moved.append((module, _module_device(module)))
        module.to(device)
    return moved


# ---------------------------------------------------------------------------------- replay
def _fit_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast a batch-1 tensor to ``batch`` rows (a view); pass matching tensors through."""
    if t.ndim < 2 or t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(
        f"block kwarg with batch dimension {t.shape[0]} cannot serve a batch of {batch}: capture "
        f"with batch_size=1 or with identical rows (no per-sample padding masks)"
    )


def prepare_block_kwargs(
    block_kwargs: dict[str, Any], *, batch: int, device: torch.device | str, dtype: torch.dtype
) -> dict[str, Any]:
    """The kwargs for a ``(batch, L, H)`` call on ``device``; floating tensors cast to ``dtype``.

    Hoist this out of a training loop that reuses the same batch size, then call the block
    directly (or pass the result to :func:`run_block`, which then only checks it).
    """

    def convert(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return _fit_batch(t, batch)

    return {key: _map_tensors(value, convert) for key, value in block_kwargs.items()}


def run_block(
    block: nn.Module,
    x: torch.Tensor,
    block_kwargs: dict[str, Any],
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Call ``block`` on hidden states ``x`` (B, L, H); return its output hidden states (B, L, H).

    ``x`` and the kwargs are moved to ``device`` (default: ``x``'s device); the block must
    already be there. Works whether the block returns a tensor or a tuple.
    """
    device = torch.device(device) if device is not None else x.device
    x = x.to(device)
    kwargs = prepare_block_kwargs(block_kwargs, batch=x.shape[0], device=device, dtype=x.dtype)
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out
