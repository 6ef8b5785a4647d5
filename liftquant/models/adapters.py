"""Model-family adapters: which modules of a causal LM the quantizer touches, as data.

An adapter names, for one family of architectures (selected by ``config.model_type``, never by
a substring of a checkpoint path):

- ``blocks``: the dotted path of the ``nn.ModuleList`` of decoder blocks;
- ``pre_block``: the modules that run before block 0 (embedding, rotary embedding); only these
  have to be on the accelerator while block inputs are captured;
- ``groups``: ordered groups of linear layers *inside a block* that read the same input, and
  therefore share one input-channel scale ``s1`` (paper Eq. 2) and one set of input statistics;
- ``alt_groups``: alternative group sets for architectures whose blocks differ (e.g. hybrid
  linear-attention blocks); the first set whose names all exist in a block is used;
- a ``*`` in a linear name (``mlp.experts.*.gate_proj``) expands to one group per entry of the
  ``nn.ModuleList`` before it: one group per expert of an MoE block, after
  :func:`liftquant.models.moe.unfuse_experts` turned the fused 3-D experts into linears;
- ``norm_fusion``: which RMSNorm feeds which group (by index into the chosen group set), for
  folding the norm weight into the input columns of that group's linears;
- ``fuse_norms``: whether that folding is allowed for the family at all;
- ``skip``: modules that stay in full precision (the LM head by default).

Adding a family is one :func:`register_adapter` call with a new :class:`ModelAdapter`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

#: The flag that lets a user pick an adapter by hand; named in error messages.
ADAPTER_OVERRIDE_FLAG = "--adapter"

LLAMA_ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LLAMA_ATTN_OUT = ("self_attn.o_proj",)
LLAMA_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")
LLAMA_MLP_OUT = ("mlp.down_proj",)
#: The Llama block layout; shared by every "Llama-like" family (cf. AQLM ``LLAMA_LIKE``).
LLAMA_GROUPS = (LLAMA_ATTN_QKV, LLAMA_ATTN_OUT, LLAMA_MLP_IN, LLAMA_MLP_OUT)
#: input_layernorm feeds q/k/v (group 0); post_attention_layernorm feeds gate/up (group 2).
LLAMA_NORM_FUSION = (("input_layernorm", 0), ("post_attention_layernorm", 2))


@dataclass(frozen=True)
class ModelAdapter:
    """Where the quantizer finds blocks, linear groups and norms in one model family."""

    model_types: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]
    blocks: str = "model.layers"
    pre_block: tuple[str, ...] = ("model.embed_tokens", "model.rotary_emb")
    alt_groups: tuple[tuple[tuple[str, ...], ...], ...] = ()
    norm_fusion: tuple[tuple[str, int], ...] = ()
    fuse_norms: bool = True
    skip: tuple[str, ...] = ("lm_head",)
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    embed: str = "model.embed_tokens"
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.norm_fusion, Mapping):  # accept {"input_layernorm": 0, ...}
            object.__setattr__(self, "norm_fusion", tuple(self.norm_fusion.items()))
        if not self.model_types:
            raise ValueError("ModelAdapter needs at least one model_type")
        for group_set in (self.groups, *self.alt_groups):
            if not group_set or any(not group for group in group_set):
                raise ValueError(f"adapter {self.model_types}: empty linear group in {group_set}")
            names = [name for group in group_set for name in group]
            if len(names) != len(set(names)):
                raise ValueError(
                    f"adapter {self.model_types}: a linear appears twice in {group_set}"
                )
        n_groups = min(len(group_set) for group_set in (self.groups, *self.alt_groups))
        for norm_name, group_index in self.norm_fusion:
            if not 0 <= group_index < n_groups:
                raise ValueError(
                    f"adapter {self.model_types}: norm {norm_name!r} fuses into group {group_index}, "
                    f"but a group set has only {n_groups} groups"
                )

    # ----------------------------------------------------------------------------- lookups
    @property
    def norm_fusion_map(self) -> dict[str, int]:
        """``norm_fusion`` as ``{norm name: group index}``."""
        return dict(self.norm_fusion)

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks of ``model`` (the ``nn.ModuleList`` at ``self.blocks``)."""
        blocks = _resolve(model, self.blocks, what="block list")
        if not isinstance(blocks, nn.ModuleList):
            raise TypeError(f"{self.blocks!r} is a {type(blocks).__name__}, expected nn.ModuleList")
        return blocks

    def get_module(self, model: nn.Module, name: str) -> nn.Module:
        """Any module of ``model`` by dotted path (e.g. ``self.final_norm``), with a clear error."""
        return _resolve(model, name, what="module")

    def block_groups(self, block: nn.Module) -> tuple[tuple[str, ...], ...]:
        """The linear groups of this block: ``groups`` or the first ``alt_groups`` set that fits.

        Every name of the chosen set must resolve to an ``nn.Linear`` inside ``block``.
        """
        candidates = tuple(_expand_experts(block, s) for s in (self.groups, *self.alt_groups))
        for group_set in candidates:
            if all(_has_module(block, name) for group in group_set for name in group):
                for group in group_set:
                    for name in group:
                        self.get_linear(block, name)  # type check with a clear error
                return group_set
        missing = [
            [name for group in group_set for name in group if not _has_module(block, name)]
            for group_set in candidates
        ]
        raise ValueError(
            f"block {type(block).__name__} matches none of the linear group sets of the adapter "
            f"for {self.model_types}; missing per set: {missing}. Pick another adapter with "
            f"{ADAPTER_OVERRIDE_FLAG} or register one with liftquant.models.register_adapter."
        )

    def fusion_pairs(self, block: nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``(norm name, linear names it feeds)`` for this block; empty if ``fuse_norms`` is off.

        Folding norm weight g into those linears (W <- W diag(g), g <- 1) leaves the block's
        function unchanged for an RMSNorm of the form ``g * x / rms(x)``.
        """
        if not self.fuse_norms:
            return ()
        groups = self.block_groups(block)
        pairs = []
        for norm_name, group_index in self.norm_fusion:
            _resolve(block, norm_name, what="norm")
            pairs.append((norm_name, groups[group_index]))
        return tuple(pairs)

    def linear_names(self, block: nn.Module) -> tuple[str, ...]:
        """All linear names of this block's groups, flattened in group order."""
        return tuple(name for group in self.block_groups(block) for name in group)

    def get_linear(self, block: nn.Module, name: str) -> nn.Module:
        """The linear layer at dotted path ``name`` inside ``block``.

        Accepts ``nn.Linear`` and any module exposing ``in_features``/``out_features`` (a layer
        the quantizer already swapped in), so it can be called again after replacement.
        """
        module = _resolve(block, name, what="linear")
        if not isinstance(module, nn.Linear) and not _is_swapped_linear(module):
            raise TypeError(f"{name!r} is a {type(module).__name__}, expected nn.Linear")
        return module

    def set_module(self, root: nn.Module, name: str, new: nn.Module) -> nn.Module:
        """Replace the module at dotted path ``name`` under ``root``; returns the old module."""
        return set_module(root, name, new)


# --------------------------------------------------------------------------- path helpers
def _resolve(root: nn.Module, name: str, *, what: str) -> nn.Module:
    try:
        return root.get_submodule(name)
    except AttributeError as err:
        raise AttributeError(
            f"{type(root).__name__} has no {what} at {name!r} ({err}). The adapter does not fit this "
            f"model; pick another with {ADAPTER_OVERRIDE_FLAG}."
        ) from None


def _expand_experts(block: nn.Module, group_set: tuple[tuple[str, ...], ...]
                    ) -> tuple[tuple[str, ...], ...]:
    """Groups whose names hold ``*`` (``mlp.experts.*.gate_proj``) become one group per index
    of the ``nn.ModuleList`` before the ``*`` (one group per expert); a missing list leaves the
    pattern as is (so the set does not fit this block)."""
    out: list[tuple[str, ...]] = []
    for group in group_set:
        if not any("*" in name for name in group):
            out.append(group)
            continue
        prefix = group[0].split("*", 1)[0].rstrip(".")
        container = block.get_submodule(prefix) if _has_module(block, prefix) else None
        if not isinstance(container, nn.ModuleList):
            out.append(group)
            continue
        out.extend(tuple(name.replace("*", str(i)) for name in group)
                   for i in range(len(container)))
    return tuple(out)


def _has_module(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
    except AttributeError:
        return False
    return True


def _is_swapped_linear(module: nn.Module) -> bool:
    """Quantized replacements expose ``in_features``/``out_features`` like ``nn.Linear``."""
    return hasattr(module, "in_features") and hasattr(module, "out_features")


def set_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at dotted path ``name`` under ``root``; return the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    if isinstance(parent, nn.ModuleList | nn.Sequential) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
    return old


# ------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter, *, replace: bool = False) -> ModelAdapter:
    """Register ``adapter`` for each of its ``model_types``; returns it (usable as a one-liner)."""
    for model_type in adapter.model_types:
        if model_type in _REGISTRY and not replace and _REGISTRY[model_type] != adapter:
            raise ValueError(f"an adapter for model_type {model_type!r} is already registered")
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def supported_model_types() -> tuple[str, ...]:
    """The model types that have an adapter, sorted."""
    return tuple(sorted(_REGISTRY))


def get_adapter(config: Any, *, override: str | None = None) -> ModelAdapter:
    """The adapter for ``config.model_type`` (``config`` may also be the model_type string).

    ``override`` names a registered model type whose adapter is used instead (the CLI's
    ``--adapter``), e.g. for a fine-tuned derivative that reports its own model_type.
    """
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    key = override if override else model_type
    if key in _REGISTRY:
        return _REGISTRY[key]
    supported = ", ".join(supported_model_types())
    if key in UNSUPPORTED_MODEL_TYPES:
        raise UnsupportedFamilyError(
            f"MoE quantization is not supported yet: model_type {key!r}: "
            f"{UNSUPPORTED_MODEL_TYPES[key]}. Supported model types: {supported}."
        )
    if override:
        raise ValueError(
            f"{ADAPTER_OVERRIDE_FLAG} {override!r} is not a registered adapter. "
            f"Supported: {supported}."
        )
    raise ValueError(
        f"model_type {model_type!r} has no liftquant adapter. Supported model types: {supported}. "
        f"If the architecture is laid out like one of them, pass {ADAPTER_OVERRIDE_FLAG} <type> "
        f"(e.g. {ADAPTER_OVERRIDE_FLAG} llama); otherwise register a ModelAdapter with "
        f"liftquant.models.register_adapter."
    )


def iter_adapters() -> Iterable[tuple[str, ModelAdapter]]:
    """``(model_type, adapter)`` pairs of the registry, sorted by model type."""
    return sorted(_REGISTRY.items())


def _llama_like(model_types: tuple[str, ...], **fields: Any) -> ModelAdapter:
    return ModelAdapter(
        model_types=model_types, groups=LLAMA_GROUPS, norm_fusion=LLAMA_NORM_FUSION, **fields
    )


# ------------------------------------------------------------------------ built-in families
LLAMA = register_adapter(_llama_like(("llama",), notes="Llama 2/3, SmolLM2"))
MISTRAL = register_adapter(_llama_like(("mistral",), notes="same block layout as Llama"))
# Qwen2 = Llama with biases on q/k/v (cf. GPTQModel ``Qwen2QModel(LlamaQModel): pass``).
QWEN2 = register_adapter(_llama_like(("qwen2",), notes="Llama layout, q/k/v biases"))
# Qwen3 adds q_norm/k_norm (RMSNorm over head_dim) *after* q_proj/k_proj: the linear groups are
# unchanged. Folding input_layernorm into q/k/v stays exact mathematically, but the authors'
# release skips norm fusion for Qwen3, so the flag is off here to reproduce their numbers.
QWEN3 = register_adapter(
    _llama_like(
        ("qwen3",), fuse_norms=False, notes="q_norm/k_norm inside attention; no norm fusion"
    )
)

# Qwen3.5 (dense hybrid). Decoder layers are chosen by ``config.layer_types``: "linear_attention"
# layers carry a Gated DeltaNet (``linear_attn``), "full_attention" layers a gated attention
# (q_proj is 2x wide: query and output gate; q_norm/k_norm after q/k). Every layer ends in a
# SwiGLU ``mlp``. Quantized in a linear-attention block: in_proj_qkv + in_proj_z (one input, one
# s1), out_proj and the MLP; in_proj_b / in_proj_a (num_v_heads outputs each), the depthwise
# conv1d, A_log, dt_bias and the gated norm stay in full precision. Qwen3.5's RMSNorm computes
# x/rms(x) * (1 + w) (zero-centred weight), so folding w into the next linear would be wrong:
# fuse_norms is off. ``qwen3_5_text`` is Qwen3_5ForCausalLM (also what AutoModelForCausalLM builds
# from a Qwen3.5 checkpoint); ``qwen3_5`` is Qwen3_5ForConditionalGeneration, whose language
# model sits at ``model.language_model`` next to the vision tower ``model.visual`` (kept FP).
QWEN3_5_LINEAR_ATTN_IN = ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z")
QWEN3_5_LINEAR_ATTN_OUT = ("linear_attn.out_proj",)
QWEN3_5_LINEAR_GROUPS = (QWEN3_5_LINEAR_ATTN_IN, QWEN3_5_LINEAR_ATTN_OUT, LLAMA_MLP_IN,
                         LLAMA_MLP_OUT)
QWEN3_5_NOTES = ("hybrid Gated DeltaNet / gated attention; in_proj_b/a, conv1d, norms FP; "
                 "no norm fusion (1 + w RMSNorm)")
QWEN3_5_TEXT = register_adapter(ModelAdapter(
    model_types=("qwen3_5_text",), groups=LLAMA_GROUPS, alt_groups=(QWEN3_5_LINEAR_GROUPS,),
    fuse_norms=False, notes=QWEN3_5_NOTES + " (Qwen3_5ForCausalLM)"))
_LM = "model.language_model"
QWEN3_5 = register_adapter(ModelAdapter(
    model_types=("qwen3_5",), groups=LLAMA_GROUPS, alt_groups=(QWEN3_5_LINEAR_GROUPS,),
    fuse_norms=False, blocks=f"{_LM}.layers",
    pre_block=(f"{_LM}.embed_tokens", f"{_LM}.rotary_emb"),
    skip=("lm_head", "model.visual"), final_norm=f"{_LM}.norm", embed=f"{_LM}.embed_tokens",
    notes=QWEN3_5_NOTES + " (Qwen3_5ForConditionalGeneration; vision tower FP)"))


class UnsupportedFamilyError(NotImplementedError, ValueError):
    """A known model family the quantizer cannot handle yet (a ValueError, so the entry
    scripts report it in one line before any weights are read)."""


# Mixture-of-Experts. The fused 3-D experts are unfused into per-expert nn.Linear modules by
# liftquant.models.moe.unfuse_experts (called by the block loop and the loaders); then every
# expert is two groups (gate/up share the routed tokens, down). The router ``mlp.gate`` and
# Qwen3.5-MoE's ``shared_expert_gate`` stay FP; no norm fusion (it would have to scale the FP
# router too).
MOE_EXPERT_IN = ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj")
MOE_EXPERT_OUT = ("mlp.experts.*.down_proj",)
MOE_GROUPS = (LLAMA_ATTN_QKV, LLAMA_ATTN_OUT, MOE_EXPERT_IN, MOE_EXPERT_OUT)
SHARED_EXPERT_IN = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")
SHARED_EXPERT_OUT = ("mlp.shared_expert.down_proj",)
MOE_NOTES = "experts unfused per expert; router FP; no norm fusion"
MIXTRAL = register_adapter(ModelAdapter(
    model_types=("mixtral",), groups=MOE_GROUPS, fuse_norms=False, notes=MOE_NOTES))
QWEN3_MOE = register_adapter(ModelAdapter(
    model_types=("qwen3_moe",), groups=MOE_GROUPS, fuse_norms=False,
    notes=MOE_NOTES + "; q_norm/k_norm"))
_QWEN3_5_MOE_MLP = (MOE_EXPERT_IN, MOE_EXPERT_OUT, SHARED_EXPERT_IN, SHARED_EXPERT_OUT)
QWEN3_5_MOE_TEXT = register_adapter(ModelAdapter(
    model_types=("qwen3_5_moe_text",), groups=(LLAMA_ATTN_QKV, LLAMA_ATTN_OUT, *_QWEN3_5_MOE_MLP),
    alt_groups=((QWEN3_5_LINEAR_ATTN_IN, QWEN3_5_LINEAR_ATTN_OUT, *_QWEN3_5_MOE_MLP),),
    fuse_norms=False, notes=QWEN3_5_NOTES + "; " + MOE_NOTES + "; shared expert quantized"))
QWEN3_5_MOE = register_adapter(ModelAdapter(
    model_types=("qwen3_5_moe",), groups=QWEN3_5_MOE_TEXT.groups,
    alt_groups=QWEN3_5_MOE_TEXT.alt_groups, fuse_norms=False, blocks=f"{_LM}.layers",
    pre_block=(f"{_LM}.embed_tokens", f"{_LM}.rotary_emb"),
    skip=("lm_head", "model.visual"), final_norm=f"{_LM}.norm", embed=f"{_LM}.embed_tokens",
    notes=QWEN3_5_MOE_TEXT.notes + " (vision tower FP)"))

#: Families that load in transformers but whose blocks the quantizer cannot handle yet, with
#: the reason; :func:`get_adapter` refuses them with that reason instead of "no adapter".
UNSUPPORTED_MODEL_TYPES: dict[str, str] = {
    "qwen2_moe": (
        "its sparse MoE block (fused 3-D experts, router, shared expert with its own gate) has "
        "no tested adapter; the supported MoE layouts are mixtral, qwen3_moe and qwen3_5_moe. "
        "If it matches qwen3_5_moe_text's MLP, try --adapter at your own risk"
    ),
}


def as_mapping(adapter: ModelAdapter) -> Mapping[str, Any]:
    """A JSON-friendly description of ``adapter`` (for run reports)."""
    return {
        "model_types": list(adapter.model_types),
        "blocks": adapter.blocks,
        "groups": [list(g) for g in adapter.groups],
        "alt_groups": [[list(g) for g in s] for s in adapter.alt_groups],
        "norm_fusion": dict(adapter.norm_fusion),
        "fuse_norms": adapter.fuse_norms,
        "skip": list(adapter.skip),
    }
