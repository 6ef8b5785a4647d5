"""Grouped sibling layers (q/k/v, gate/up as one T* and one GEMV launch): ``engine.groups``.

* On CPU (torch backend): grouping re-points the members' buffers at views of the group's
  tensors without changing any output, and refuses members that cannot share launches.
* Under ``TRITON_INTERPRET=1``: the stacked transform writes each member's pair layout exactly
  as a single-layer launch does, and the grouped split-K GEMV (members of different row
  counts, split factors that do and do not divide the packed width, with and without bias)
  matches each member's float64 dense reference.
* The decode step with groups reproduces transformers' forward (``test_kernels``).
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from liftquant.engine.groups import PackedGroup, groupable, sibling_groups
from liftquant.kernels import registry, torch_ref
from liftquant.kernels.int1_words import HAS_TRITON
from liftquant.models.adapters import LLAMA_ATTN_QKV, LLAMA_MLP_IN

SIBLINGS = (LLAMA_ATTN_QKV, LLAMA_MLP_IN)
from tests.test_gemv_splitk import _run_interpreted
from tests.test_kernels import _fresh_registry, rand_layer, rel_err  # noqa: F401 (autouse)


def test_group_keeps_outputs_and_shares_storage():
    layers = [rand_layer(100, N, "24to10", bias=True, seed=N) for N in (24, 8, 8)]
    x = torch.randn(3, 100)
    before = [m(x) for m in layers]
    group = PackedGroup(layers)
    assert group.members == (24, 8, 8) and group.L.shape[0] == 3
    for i, m in enumerate(layers):  # views, not copies
        assert m.L.data_ptr() == group.L[i].data_ptr()
        assert m.packed_signs.untyped_storage().data_ptr() == \
            group.packed_signs.untyped_storage().data_ptr()
    after = group(x)  # CPU: member by member through the torch backend
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b)
    assert not group.fused_call(x.half())  # torch backend: no grouped kernels


def test_groupable_refuses_mismatched_members():
    a = rand_layer(64, 16, "16to8", bias=False)
    assert groupable([a]) is not None  # one member is no group
    assert "differ" in groupable([a, rand_layer(64, 16, "20to8", bias=False)])
    assert "differ" in groupable([a, rand_layer(64, 16, "16to8", bias=True)])
    assert "differ" in groupable([a, rand_layer(80, 16, "16to8", bias=False)])
    assert "PackedLiftLinear" in groupable([a, torch.nn.Linear(64, 16)])
    with pytest.raises(ValueError, match="cannot group"):
        PackedGroup([a, torch.nn.Linear(64, 16)])


def test_sibling_groups_skip_dense_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    model = LlamaForCausalLM(cfg)
    layer = model.model.layers[1]
    for path, n_out in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):
        setattr(layer.self_attn, path, rand_layer(64, n_out, "16to8", bias=False, seed=n_out))
    groups = [sibling_groups(b, SIBLINGS) for b in model.model.layers]
    assert groups[0] == {} and set(groups[1]) == {LLAMA_ATTN_QKV}  # gate/up stay dense
    assert groups[1][LLAMA_ATTN_QKV].members == (64, 32, 32)


GROUP_CHECK = textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    from liftquant.kernels import gemv_splitk as gs, registry, torch_ref, triton_int1 as ti
    from liftquant.engine.groups import PackedGroup
    from tests.test_kernels import _fresh_registry, rand_layer, rel_err  # noqa: F401 (autouse)

    # (in, member rows, lattice, bias, split configs (block_w, block_n, rows/program))
    CASES = [(200, (24, 8, 8), "24to10", True, [(4, 2, 4), (16, 4, 8)]),
             (256, (12, 20), "16to8", False, [(8, 4, 8), (32, 2, 6)])]
    for n, members, spec, bias, cfgs in CASES:
        layers = [rand_layer(n, N, spec, bias=bias, seed=N + i)
                  for i, N in enumerate(members)]
        x = torch.randn(1, n).half()
        singles = [ti.launch_transform(x, m.s1, m.L, m.R, m.s2_act, d=m.spec.target_dim,
                                       D=m.spec.lifted_dim, pairs=True) for m in layers]
        dense = [torch_ref.dense_linear(m, x.float()) for m in layers]
        group = PackedGroup(layers)
        d, D = group.spec.target_dim, group.spec.lifted_dim
        xp, wsc = ti.launch_transform(x, group.s1, group.L, group.R, group.s2_act, d=d, D=D,
                                      pairs=True)
        assert xp.shape[0] == len(members)
        for i, (sxp, swsc) in enumerate(singles):  # the stacked launch = single launches
            assert torch.equal(xp[i], sxp[0]) and torch.equal(wsc[i], swsc[0]), i
        for block_w, block_n, rpp in cfgs:
            cfg = gs.SplitKConfig(block_w, block_n, rpp, 1)
            out = gs.launch_gemv_splitk(xp, wsc, group.packed_signs, group.scale, group.bias,
                                        torch.float16, cfg=cfg, members=members)
            assert out.shape == (1, sum(members))
            for o, ref in zip(out.split(members, dim=-1), dense):
                assert rel_err(o, ref) < 3e-3, (spec, cfg, rel_err(o, ref))
            assert int(gs.WORKSPACES.current["cpu"][1].abs().sum()) == 0
        try:
            gs.launch_gemv_splitk(xp, wsc, group.packed_signs, group.scale, group.bias,
                                  torch.float16, cfg=cfg, members=members[:-1])
            raise AssertionError("mismatched members accepted")
        except ValueError as err:
            assert "members" in str(err)
        # the module through the Triton backend: grouped launches
        registry.set_backend(group, "triton")
        for m in layers:
            m.backend = "triton"
        assert group.fused_call(x)
        for o, ref in zip(group(x), dense):
            assert rel_err(o, ref) < 3e-3
    print("ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_grouped_kernels_match_reference_in_interpreter():
    _run_interpreted(GROUP_CHECK)


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,members,spec,bias", [(4096, (4096, 1024, 1024), "20to8", False),
                                                  (896, (896, 128, 128), "24to10", True),
                                                  (576, (1536, 1536), "16to8", False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_matches_members_cuda(n, members, spec, bias, dtype):
    """Tuned grouped launches equal the members' own Triton calls, eagerly and replayed in a
    CUDA graph."""
    layers = [rand_layer(n, N, spec, bias=bias, seed=i, device="cuda")
              for i, N in enumerate(members)]
    registry.set_backend(torch.nn.ModuleList(layers), "triton")
    x = torch.randn(1, n, device="cuda", dtype=dtype)
    single = [m(x) for m in layers]
    refs = [torch_ref.linear(m, x.float()) for m in layers]
    group = PackedGroup(layers)
    assert group.fused_call(x)
    eager = group(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = group(x)
    graph.replay()
    torch.cuda.synchronize()
    for e, r, s, ref in zip(eager, replayed, single, refs):
        assert torch.equal(e, r)
        assert rel_err(e, ref) < 2e-2 and rel_err(s, ref) < 2e-2
        assert rel_err(e, s) < 1e-2


def test_grouped_model_saves_and_reloads(tmp_path):
    """Grouping leaves the model savable (its buffers are views of the group's tensors)."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from liftquant.io.checkpoint import _state_for_saving

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    model = LlamaForCausalLM(cfg)
    att = model.model.layers[0].self_attn
    for path, n_out in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):
        setattr(att, path, rand_layer(64, n_out, "16to8", bias=False, seed=n_out))
    sibling_groups(model.model.layers[0], SIBLINGS)
    state = _state_for_saving(model)
    save_file(state, str(tmp_path / "m.safetensors"))  # raises on shared storage
    back = load_file(str(tmp_path / "m.safetensors"))
    assert torch.equal(back["model.layers.0.self_attn.k_proj.packed_signs"],
                       att.k_proj.packed_signs)
