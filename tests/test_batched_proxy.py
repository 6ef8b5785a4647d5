"""Stage-1 proxy weights of same-shape LiftLinears in one batched computation
(liftquant.core.proxy_batch) and the MoE experts forward that uses it (models.moe.ExpertList).

Tolerances: the batched path runs the per-layer arithmetic with a leading layer dim, so in
float64 it agrees to 1e-12. In float32 it differs only in the summation order of the
matmuls and their backward (the gradient of a Cayley generator sums ``out * n2`` products),
so forward values agree to ``1e-6 * max|w|`` and gradients to ``1e-5 * max|grad|``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from liftquant.core.linear import LiftLinear
from liftquant.core.proxy_batch import (
    batch_groups,
    batched_proxy_weights,
    stacked_proxy_weight,
    supplied_proxy_weights,
)
from liftquant.models.moe import ExpertList, ExpertMLP

STAGE1 = ("P1_skew", "P2_skew", "s1", "s2", "clip")


def _params(layer: LiftLinear) -> list[nn.Parameter]:
    w = layer.whiten
    return [w.P1_skew, w.P2_skew, w.s1, w.s2, layer.proxy.clip]


@torch.no_grad()
def _perturb(layer: LiftLinear, gen: torch.Generator) -> LiftLinear:
    """Move every stage-1 parameter off its initialisation (clip across both clamp ends)."""
    w = layer.whiten
    for s in (w.s1, w.s2):
        s.mul_(torch.rand(s.shape, generator=gen) + 0.5)
    for S in (w.P1_skew, w.P2_skew):
        S.copy_(0.05 * torch.randn(S.shape, generator=gen))
    layer.proxy.clip.copy_(0.2 + 0.9 * torch.rand(layer.proxy.clip.shape, generator=gen))
    return layer


def _layers(n: int, out: int, inp: int, spec: str = "8to4", seed: int = 0) -> list[LiftLinear]:
    gen = torch.Generator().manual_seed(seed)
    return [_perturb(LiftLinear(torch.randn(out, inp, generator=gen), None, spec=spec), gen)
            for _ in range(n)]


def _close(got, want, rel: float, what: str) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        a, b = a.detach(), b.detach()
        err, mag = float((a - b).abs().max()), float(b.abs().max())
        assert err <= rel * mag, f"{what} {i}: max |diff| {err:.3g} > {rel} * {mag:.3g}"


def _values_and_grads(layers, fn):
    ws = fn(layers)
    gen = torch.Generator().manual_seed(123)
    ups = [torch.randn(w.shape, generator=gen, dtype=w.dtype) for w in ws]
    params = [p for layer in layers for p in _params(layer)]
    grads = torch.autograd.grad(sum((w * u).sum() for w, u in zip(ws, ups, strict=True)), params)
    return [w.detach() for w in ws], grads


def _reference(layers):
    return [layer.proxy_weight() for layer in layers]


@pytest.mark.parametrize(("out", "inp", "spec"), [(64, 128, "8to4"), (48, 100, "8to4"),
                                                  (40, 128, "20to8"), (24, 576, "8to4")])
def test_batched_equals_per_layer_values_and_gradients(out, inp, spec):
    """Shapes with and without padding, two lattices; every stage-1 parameter's gradient."""
    layers = _layers(5, out, inp, spec)
    want_w, want_g = _values_and_grads(layers, _reference)
    got_w, got_g = _values_and_grads(layers, batched_proxy_weights)
    _close(got_w, want_w, 1e-6, "proxy weight")
    names = [f"layer {i} {name}" for i in range(len(layers)) for name in STAGE1]
    for name, a, b in zip(names, got_g, want_g, strict=True):
        _close([a], [b], 1e-5, name)
    assert all(g.abs().sum() > 0 for g in want_g)  # every parameter is really trained

    for layer in layers:  # float64: the same arithmetic, so agreement far below float32 eps
        layer.double()
    want_w, want_g = _values_and_grads(layers, _reference)
    got_w, got_g = _values_and_grads(layers, batched_proxy_weights)
    assert got_w[0].dtype == torch.float64
    _close(got_w, want_w, 1e-12, "float64 proxy weight")
    _close(got_g, want_g, 1e-10, "float64 gradient")


def test_checkpointed_chunks_and_no_grad(monkeypatch):
    """checkpoint_proxy: recomputed in backward, in chunks (two layers each here), same values
    and gradients; without grad no graph is built."""
    layers = _layers(5, 32, 64)
    want_w, want_g = _values_and_grads(layers, batched_proxy_weights)
    from liftquant.core import proxy_batch

    monkeypatch.setattr(proxy_batch, "CHECKPOINT_ELEMENTS", 2 * 32 * 64)
    calls = []
    real = proxy_batch._stack
    monkeypatch.setattr(proxy_batch, "_stack", lambda ls, **kw: calls.append(len(ls)) or
                        real(ls, **kw))
    for layer in layers:
        layer.checkpoint_proxy = True
    got_w, got_g = _values_and_grads(layers, batched_proxy_weights)
    # forward chunks, then their recomputation in backward (in the order backward reaches them)
    assert calls[:3] == [2, 2, 1] and sorted(calls[3:]) == [1, 2, 2]
    assert all(torch.equal(a, b) for a, b in zip(got_w, want_w, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(got_g, want_g, strict=True))
    with torch.no_grad():
        ws = batched_proxy_weights(layers)
    assert not any(w.requires_grad for w in ws)
    assert all(torch.equal(a, b) for a, b in zip(ws, want_w, strict=True))


def test_grouping_and_refusal():
    """Groups by shape and settings; lattice-mode layers, plain linears and singletons keep
    the per-layer path; mixed layers are refused by the batched function."""
    a, b = _layers(3, 32, 64), _layers(2, 16, 64)
    odd = _layers(1, 32, 48)
    ckpt = _layers(2, 32, 64)
    for layer in ckpt:
        layer.checkpoint_proxy = True
    plain = nn.Linear(64, 32)
    (rounded,) = _layers(1, 32, 64)
    rounded.mode = "lattice"  # stands for a layer after round_to_lattice (only mode is read)
    groups = batch_groups([a[0], b[0], plain, odd[0], a[1], ckpt[0], rounded, b[1], a[2],
                           ckpt[1]])
    assert [[id(x) for x in g] for g in groups] == [[id(x) for x in grp] for grp in (a, b, ckpt)]
    with pytest.raises(ValueError, match="one shape"):
        batched_proxy_weights([a[0], b[0]])
    with pytest.raises(ValueError, match="one shape"):
        batched_proxy_weights([a[0], ckpt[0]])
    with pytest.raises(ValueError, match="one shape"):
        batched_proxy_weights([])


def test_supplied_weights_are_cleared_even_after_an_error():
    layers = _layers(3, 32, 64)
    with pytest.raises(RuntimeError, match="boom"), supplied_proxy_weights(layers) as supplied:
        assert len(supplied) == 3 and all(x.step_weight is not None for x in layers)
        raise RuntimeError("boom")
    assert all(x.step_weight is None for x in layers)


def _experts(sizes: list[int], hidden: int = 32, seed: int = 0) -> ExpertList:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    experts = ExpertList([ExpertMLP(hidden, inter, nn.SiLU()) for inter in sizes])
    for mlp in experts:
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer = LiftLinear.from_linear(getattr(mlp, name), spec="8to4")
            setattr(mlp, name, _perturb(layer, gen))
    return experts


def _routing(n_experts: int, T: int = 40, k: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 32, generator=gen)
    idx = torch.randint(0, n_experts + 1, (T, k), generator=gen)  # index E: dropped token
    idx[idx == 2] = 3  # expert 2 receives no token
    return x, idx, torch.rand(T, k, generator=gen)


def _run_experts(experts: ExpertList, x, idx, w):
    xg = x.clone().requires_grad_(True)
    out = experts(xg, idx, w)
    out.square().sum().backward()
    grads = {n: p.grad for n, p in experts.named_parameters()}
    xgrad = xg.grad
    experts.zero_grad(set_to_none=True)
    return out.detach(), grads, xgrad


def _close_expert_grads(got: dict, want: dict, *, unrouted: int) -> None:
    """Expert parameter gradients agree to ``1e-5`` of the largest gradient of the same
    parameter over the experts. Through a whole expert the upstream gradient of a proxy weight
    already differs by rounding, and a small generator gradient is the difference of large
    terms (a 2 x 2 ``P1_skew`` of a down projection: 0.09 from terms of size 2), so its own
    magnitude is no measure of its rounding error."""
    assert got.keys() == want.keys()
    scale: dict[str, float] = {}
    for name, g in want.items():
        role = name.split(".", 1)[1]
        if g is not None:
            scale[role] = max(scale.get(role, 0.0), float(g.abs().max()))
    for name, g in want.items():
        if name.startswith(f"{unrouted}."):  # this expert received no token: no gradient
            assert g is None and got[name] is None, name
            continue
        assert g is not None and got[name] is not None, name
        err = float((got[name] - g).abs().max())
        bound = 1e-5 * scale[name.split(".", 1)[1]]
        assert err <= bound, f"{name}: max |diff| {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("checkpoint_proxy", [False, True])
def test_expert_list_batched_equals_per_layer(monkeypatch, checkpoint_proxy):
    """Stage-1 forward + backward of an ExpertList: same output and gradients with and without
    the batched path; the unrouted expert gets no gradient in both; every per-layer proxy
    weight call is replaced (gate and up share one stack, down another)."""
    experts = _experts([24] * 5)
    for m in experts.modules():
        if isinstance(m, LiftLinear):
            m.checkpoint_proxy = checkpoint_proxy
    x, idx, w = _routing(len(experts))
    experts.batch_proxy = False
    want = _run_experts(experts, x, idx, w)
    per_layer, stacks = [], []
    real_step = LiftLinear._proxy_weight_for_step
    monkeypatch.setattr(LiftLinear, "_proxy_weight_for_step",
                        lambda self: per_layer.append(self) or real_step(self))
    from liftquant.core import proxy_batch

    real_stack = proxy_batch._stack
    monkeypatch.setattr(proxy_batch, "_stack", lambda ls, **kw: stacks.append(len(ls)) or
                        real_stack(ls, **kw))
    experts.batch_proxy = True
    got = _run_experts(experts, x, idx, w)
    assert per_layer == []
    assert stacks[:2] == [8, 4]  # 4 routed experts: gate+up, down (then recomputed if ckpt)
    assert all(m.step_weight is None for m in experts.modules() if isinstance(m, LiftLinear))
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6 * float(want[0].abs().max()))
    _close([got[2]], [want[2]], 1e-5, "input gradient")
    _close_expert_grads(got[1], want[1], unrouted=2)
    with torch.no_grad():  # e.g. the holdout error in proxy mode
        torch.testing.assert_close(experts(x, idx, w), want[0], rtol=0,
                                   atol=1e-6 * float(want[0].abs().max()))


def test_expert_list_falls_back_when_shapes_differ(monkeypatch):
    """Experts of different widths: the down projections have no shape in common and form
    their proxy weights one by one (the gate and up of one expert still share a stack); the
    result equals the per-layer path."""
    experts = _experts([16, 24, 32, 40])
    x, idx, w = _routing(len(experts), seed=3)
    experts.batch_proxy = False
    want = _run_experts(experts, x, idx, w)
    experts.batch_proxy = True
    calls = []
    real = LiftLinear._proxy_weight_for_step
    monkeypatch.setattr(LiftLinear, "_proxy_weight_for_step",
                        lambda self: calls.append(self) or real(self))
    got = _run_experts(experts, x, idx, w)
    routed = sorted({e for e in idx.reshape(-1).tolist() if e < len(experts)})
    assert len(routed) == 3 and calls == [experts[e].down_proj for e in routed]
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6 * float(want[0].abs().max()))
    _close_expert_grads(got[1], want[1], unrouted=2)


@pytest.mark.slow
def test_compiled_batched_path_matches_eager():
    """compile_proxy: one compiled graph of the stacked function (dynamic in the number of
    layers) gives the eager values and gradients to float32 rounding."""
    from torch._dynamo.utils import counters

    from liftquant.core import proxy_batch

    torch._dynamo.reset()
    counters.clear()

    proxy_batch._COMPILED = None
    for n in (3, 5):
        layers = _layers(n, 32, 64, seed=n)
        want_w, want_g = _values_and_grads(layers, batched_proxy_weights)
        for layer in layers:
            layer.compile_proxy = True
        got_w, got_g = _values_and_grads(layers, batched_proxy_weights)
        _close(got_w, want_w, 1e-6, "compiled proxy weight")
        _close(got_g, want_g, 1e-5, "compiled gradient")
    assert proxy_batch._COMPILED is not None
    assert counters["stats"]["unique_graphs"] == 1  # the second stack size reuses the graph


def test_stacked_function_is_pure():
    """The math takes tensors only: one layer's stack equals its proxy weight."""
    (layer,) = _layers(1, 16, 64)
    w = layer.whiten
    one = lambda t: t[None]
    got = stacked_proxy_weight(one(layer.weight), one(w.s1), one(w.s2), one(w.P1_init),
                               one(w.P1_skew), one(w.P2_init), one(w.P2_skew),
                               one(layer.proxy.clip), d=w.d, bits=layer.proxy.bits)[0]
    _close([got], [layer.proxy_weight()], 1e-6, "single stack")


def test_compiled_proxy_only_where_a_gradient_is_taken(monkeypatch):
    """compile_proxy on: a training step (grad enabled) forms the proxy weight through the
    compiled function, a no_grad forward (holdout, validation) eagerly, in the per-layer and
    the stacked path alike; the no_grad values equal the eager proxy weight."""
    from liftquant.core import linear as lin_mod
    from liftquant.core import proxy_batch

    calls = []

    def recording(fn, tag):
        def stand_in(*a, **k):
            calls.append(tag)
            return fn(*a, **k)
        return lambda: stand_in

    monkeypatch.setattr(lin_mod, "_compiled_proxy_weight",
                        recording(LiftLinear.proxy_weight, "layer"))
    monkeypatch.setattr(proxy_batch, "_compiled_stacked",
                        recording(stacked_proxy_weight, "stack"))
    layers = _layers(3, 16, 64, seed=3)
    for layer in layers:
        layer.compile_proxy = True
    with torch.no_grad():
        want = [layer.proxy_weight() for layer in layers]
        got_layer = [layer._proxy_weight_for_step() for layer in layers]
        got_stack = batched_proxy_weights(layers)
    assert calls == []
    _close(got_layer, want, 0, "no_grad per-layer proxy")
    _close(got_stack, want, 1e-6, "no_grad stacked proxy")
    layers[0]._proxy_weight_for_step().sum().backward()
    batched_proxy_weights(layers)[0].sum().backward()
    assert calls == ["layer", "stack"]
