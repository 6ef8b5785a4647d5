"""Size accounting (issue 19 item 1): the estimate matches the saved model.safetensors."""

import pytest
import torch

from liftquant.core.lattice import LatticeSpec
from liftquant.core.linear import PackedLiftLinear, cast_unquantized
from liftquant.io.checkpoint import (
    packed_module_names,
    quantization_config,
    save_quantized,
    unique_state,
)
from liftquant.io.size import estimate_file_bytes, kv_cache_bytes, quantized_linears
from liftquant.models import get_adapter, tiny_llama, tiny_qwen2
from liftquant.models.adapters import set_module


def _pack_in_place(model, adapter, specs, seed=0):
    """Swap every quantized linear for a PackedLiftLinear with random buffers (what the
    pipeline leaves behind, without running it)."""
    g = torch.Generator().manual_seed(seed)
    for name, lin in quantized_linears(model, adapter).items():
        spec = specs if isinstance(specs, LatticeSpec) else specs[name]
        layer = PackedLiftLinear(lin.in_features, lin.out_features, spec=spec,
                                 bias=lin.bias is not None)
        for t in layer.state_dict().values():
            if t.dtype == torch.uint8:
                t.copy_(torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8))
            else:
                t.copy_(torch.randn(t.shape, generator=g))
        set_module(model, name, layer)


def _saved_bytes(model, specs, tmp_path, save_dtype):
    spec = specs if isinstance(specs, LatticeSpec) else next(iter(specs.values()))
    if save_dtype is not None:
        cast_unquantized(model, save_dtype)
    qc = quantization_config(spec=spec, M=torch.zeros(spec.target_dim, spec.lifted_dim),
                             quantized_modules=packed_module_names(model), not_converted=[])
    out = save_quantized(model, None, tmp_path / "ckpt", qconfig=qc)
    return (out / "model.safetensors").stat().st_size


@pytest.mark.parametrize("lattice", ["8to4", "12to6", "9to3", "20to8"])
@pytest.mark.parametrize("save_dtype", [None, torch.bfloat16, torch.float16])
def test_estimate_matches_saved_file(lattice, save_dtype, tmp_path):
    model = tiny_llama(seed=0)  # float32, tied head
    adapter = get_adapter(model.config)
    spec = LatticeSpec.parse(lattice)
    est = estimate_file_bytes(model, adapter, spec, save_dtype=save_dtype)
    _pack_in_place(model, adapter, spec)
    real = _saved_bytes(model, spec, tmp_path, save_dtype)
    assert abs(est - real) <= 0.005 * real, (est, real)


def test_estimate_matches_mixed_lattices_and_biases(tmp_path):
    model = tiny_qwen2(seed=0)  # q/k/v carry biases
    adapter = get_adapter(model.config)
    names = list(quantized_linears(model, adapter))
    cycle = [LatticeSpec.parse(n) for n in ("12to6", "9to3", "20to8", "8to4")]
    specs = {n: cycle[i % len(cycle)] for i, n in enumerate(names)}
    est = estimate_file_bytes(model, adapter, specs, save_dtype=torch.bfloat16)
    _pack_in_place(model, adapter, specs)
    real = _saved_bytes(model, specs, tmp_path, torch.bfloat16)
    assert abs(est - real) <= 0.005 * real, (est, real)


def test_save_dtype_halves_the_dense_part():
    model = tiny_llama(seed=0)
    adapter = get_adapter(model.config)
    spec = LatticeSpec.parse("9to3")
    f32 = estimate_file_bytes(model, adapter, spec)
    bf16 = estimate_file_bytes(model, adapter, spec, save_dtype=torch.bfloat16)
    linears = quantized_linears(model, adapter)
    dense = sum(t.numel() * 4 for k, t in unique_state(model).items()
                if k.rsplit(".", 1)[0] not in linears)  # a tied head once
    assert f32 - bf16 == pytest.approx(dense / 2, rel=0.01)


def test_kv_cache_bytes():
    model = tiny_llama(seed=0)
    c = model.config
    kv = c.num_key_value_heads or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert kv_cache_bytes(c, context=100) == 2 * c.num_hidden_layers * kv * head_dim * 100 * 2
