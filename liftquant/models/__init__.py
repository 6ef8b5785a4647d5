"""Model families (adapters as data, STYLE 2.6) and full-precision model loading."""

from liftquant.models.adapters import (
    ADAPTER_OVERRIDE_FLAG,
    ModelAdapter,
    get_adapter,
    register_adapter,
    set_module,
    supported_model_types,
)
from liftquant.models.loading import (
    load_fp_model,
    resolve_source,
    tiny_llama,
    tiny_qwen2,
    tiny_qwen3,
)

__all__ = [
    "ADAPTER_OVERRIDE_FLAG",
    "ModelAdapter",
    "get_adapter",
    "load_fp_model",
    "register_adapter",
    "resolve_source",
    "set_module",
    "supported_model_types",
    "tiny_llama",
    "tiny_qwen2",
    "tiny_qwen3",
]
