"""Load a full-precision causal LM (local folder, hub id or GGUF file) and build tiny test models.

``load_fp_model`` reads the config first and looks up the model-family adapter, so an
unsupported architecture fails before any weight is read. The model stays on the CPU in eval
mode with ``use_cache=False``: the block loop moves one block at a time to the accelerator.

GGUF files are dequantized by transformers into plain ``nn.Linear`` weights; the loader then
drops the GGUF quantizer and ``quantization_config`` so the model is treated (and saved) as an
ordinary full-precision model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from liftquant.models.adapters import get_adapter
from liftquant.util.log import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = get_logger("models")

GGUF_SUFFIX = ".gguf"
#: Any one of these in a local folder means a tokenizer can be loaded from it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
#: Shape of the tiny random models used by the CPU tests (STYLE 2.8).
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "use_cache": False,
}
#: Std of the perturbation added to tiny-model norm weights (around 1) and linear biases
#: (around 0), so norm fusion and bias handling bugs change the output visibly.
TINY_NORM_STD = 0.1
TINY_BIAS_STD = 0.02
_OFFLINE_HINT = (
    "Pass a local model folder (config.json + safetensors) or a local .gguf file instead; the "
    "demo run uses the SmolLM2-135M GGUF fetched from the package index (see docs/ASSETS.md)."
)


# ------------------------------------------------------------------------------- sources
def _looks_like_local_path(name: str) -> bool:
    """True when ``name`` can only be meant as a filesystem path, never as a hub id."""
    return (
        name.startswith(("/", "./", "../", "~"))
        or name.endswith(GGUF_SUFFIX)
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def resolve_source(path_or_id: str, gguf_file: str | None = None) -> tuple[str, str | None, bool]:
    """Split the user's argument into ``(folder or hub id, gguf file name, is_local)``.

    A path to a ``.gguf`` file becomes its folder plus the file name. Raises
    ``FileNotFoundError`` for a missing local path.
    """
    path = Path(os.path.expanduser(str(path_or_id)))
    if path.is_file() and path.suffix == GGUF_SUFFIX:
        if gguf_file is not None and gguf_file != path.name:
            raise ValueError(f"gguf_file={gguf_file!r} conflicts with the file path {path_or_id!r}")
        return str(path.parent.resolve()), path.name, True
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise FileNotFoundError(f"no GGUF file {gguf_file!r} in {path}")
        if gguf_file is None and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob(f"*{GGUF_SUFFIX}"))
            hint = (f" It holds GGUF files {ggufs}: pass one of them." if ggufs else
                    " Pass --model a folder with config.json and weights, a .gguf file or a hub id.")
            raise FileNotFoundError(
                f"{path} has no config.json, so it is not a model folder.{hint}"
            )
        return str(path.resolve()), gguf_file, True
    if path.exists():
        raise FileNotFoundError(f"{path_or_id!r} is neither a model folder nor a .gguf file; "
                                "pass --model a folder with config.json and weights, a .gguf "
                                "file or a hub id")
    if _looks_like_local_path(str(path_or_id)):
        raise FileNotFoundError(
            f"model path {path_or_id!r} does not exist. Give a model folder (config.json + "
            f"weights), a .gguf file, or a Hugging Face hub id."
        )
    return str(path_or_id), gguf_file, False


def _load_config(source: str, *, gguf_file: str | None, is_local: bool, trust_remote_code: bool):
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if is_local:
        return AutoConfig.from_pretrained(source, **kwargs)
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except OSError as err:
        why = "offline mode (HF_HUB_OFFLINE) and not in the local cache" if _hub_offline() else err
        raise FileNotFoundError(
            f"{source!r} is not a local path and could not be loaded as a Hugging Face hub id "
            f"({why}). {_OFFLINE_HINT}"
        ) from err


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a transformers dependency
        return False
    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else getattr(constants, "HF_HUB_OFFLINE", False))


# ------------------------------------------------------------------------------- loading
def load_fp_model(
    path_or_id: str,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    trust_remote_code: bool = False,
    adapter: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a full-precision causal LM and its tokenizer onto the CPU (eval, ``use_cache=False``).

    ``path_or_id`` is a local model folder, a local ``.gguf`` file (or a folder plus
    ``gguf_file``), or a hub id. ``adapter`` overrides the family adapter lookup (``--adapter``);
    an unsupported ``model_type`` raises ``ValueError`` before any weight is read. The tokenizer
    is ``None`` when a local folder holds none.
    """
    from transformers import AutoModelForCausalLM

    source, gguf_file, is_local = resolve_source(path_or_id, gguf_file)
    config = _load_config(
        source, gguf_file=gguf_file, is_local=is_local, trust_remote_code=trust_remote_code
    )
    get_adapter(config, override=adapter)  # fail before reading weights
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs.update(gguf_file=gguf_file, **_gguf_dequantize_kwargs())
    else:
        kwargs["config"] = config
    logger.info("loading %s%s (%s)", source, f" [{gguf_file}]" if gguf_file else "", dtype)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if gguf_file is not None:
        _drop_quantizer(model)
    model.config.use_cache = False
    model.eval()
    from liftquant.models.moe import unfuse_experts

    unfuse_experts(model)  # MoE: per-expert linears, so every expert matrix is quantized
    tokenizer = _load_tokenizer(
        source, gguf_file=gguf_file, is_local=is_local, trust_remote_code=trust_remote_code
    )
    return model, tokenizer


def _gguf_dequantize_kwargs() -> dict[str, Any]:
    """Ask for dequantized dense weights where transformers can keep GGUF blocks (>= 5.2x)."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # older 5.x: GGUF weights are always dequantized
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_quantizer(model: PreTrainedModel) -> None:
    """Forget the GGUF quantizer so the dequantized weights count as full precision."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    vars(model.config).pop("quantization_config", None)
    for attr in ("is_quantized", "_is_quantized"):
        if attr in vars(model):
            setattr(model, attr, False)
    if getattr(model, "quantization_method", None) is not None:
        model.quantization_method = None


def _load_tokenizer(
    source: str, *, gguf_file: str | None, is_local: bool, trust_remote_code: bool
) -> PreTrainedTokenizerBase | None:
    from transformers import AutoTokenizer

    if (
        is_local
        and gguf_file is None
        and not any((Path(source) / name).is_file() for name in TOKENIZER_FILES)
    ):
        logger.warning("no tokenizer files in %s; returning tokenizer=None", source)
        return None
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    return AutoTokenizer.from_pretrained(source, **kwargs)


# ---------------------------------------------------------------------------- tiny models
def _tiny_model(model_cls: type, config_cls: type, *, seed: int, overrides: dict[str, Any]):
    """Build ``model_cls`` from the tiny config with a fixed seed, float32, eval mode.

    The global RNG state is left untouched.
    """
    config = config_cls(**{**TINY_CONFIG, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)
        _perturb_norms_and_biases(model)
    return model.eval()


@torch.no_grad()
def _perturb_norms_and_biases(model: torch.nn.Module) -> None:
    """Norm weights ~ 1 + N(0, TINY_NORM_STD²), linear biases ~ N(0, TINY_BIAS_STD²)."""
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if leaf == "weight" and param.ndim == 1 and "norm" in type(owner).__name__.lower():
            param.copy_(1.0 + TINY_NORM_STD * torch.randn_like(param))
        elif leaf == "bias" and isinstance(owner, torch.nn.Linear):
            param.copy_(TINY_BIAS_STD * torch.randn_like(param))


def tiny_llama(seed: int = 0, **overrides: Any):
    """A random 2-layer ``LlamaForCausalLM`` (hidden 64, 4 heads / 2 KV, vocab 256), float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _tiny_model(LlamaForCausalLM, LlamaConfig, seed=seed, overrides=overrides)


def tiny_qwen2(seed: int = 0, **overrides: Any):
    """A random 2-layer ``Qwen2ForCausalLM`` (q/k/v biases), same shape as :func:`tiny_llama`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _tiny_model(Qwen2ForCausalLM, Qwen2Config, seed=seed, overrides=overrides)


def tiny_qwen3(seed: int = 0, **overrides: Any):
    """A random 2-layer ``Qwen3ForCausalLM`` (q_norm/k_norm), same shape as :func:`tiny_llama`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    overrides = {
        "head_dim": TINY_CONFIG["hidden_size"] // TINY_CONFIG["num_attention_heads"],
        **overrides,
    }
    return _tiny_model(Qwen3ForCausalLM, Qwen3Config, seed=seed, overrides=overrides)
