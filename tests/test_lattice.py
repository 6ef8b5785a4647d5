import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from liftquant.core import lattice as L
from liftquant.core.lattice_train import lloyd_refine, train_projection

ROOT = Path(__file__).resolve().parent.parent


def _rand_M(d, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, D, generator=g) / D**0.5


def _brute_force(z, M):
    codes = L.all_codes(M.shape[1])
    dist = ((z[:, None, :] - (codes @ M.T)[None]) ** 2).sum(-1)  # (B, 2^D)
    return dist.min(1).values


@pytest.mark.parametrize("text,D,d", [("24to10", 24, 10), ("LQ-24/10", 24, 10), ("16/8", 16, 8)])
def test_spec_parse(text, D, d):
    spec = L.LatticeSpec.parse(text)
    assert (spec.lifted_dim, spec.target_dim, spec.name) == (D, d, f"{D}to{d}")
    assert spec.bits_per_weight == pytest.approx(D / d)


@pytest.mark.parametrize("bad", ["8to8", "4to8", "abc", "2.5to1", "64to10", "0to0"])
def test_bad_specs_fail_cleanly(bad):
    with pytest.raises(ValueError):
        L.LatticeSpec.parse(bad)


@pytest.mark.parametrize("d,D", [(4, 8), (5, 10), (3, 7)])
def test_exhaustive_equals_brute_force(d, D):
    M = _rand_M(d, D, seed=D)
    z = torch.randn(300, d, generator=torch.Generator().manual_seed(1))
    codes = L.encode(z, M, method="exhaustive")
    assert codes.dtype == torch.int8 and codes.shape == (300, D)
    got = ((z - L.decode(codes, M)) ** 2).sum(-1)
    torch.testing.assert_close(got, _brute_force(z, M), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d,D", [(4, 8), (5, 10), (6, 12)])
def test_pinv_heuristic_close_to_exhaustive(d, D):
    """The heuristic may miss the optimum; with bit-flip refinement it stays within 10% of
    exhaustive MSE, and refinement never makes a code worse."""
    M = _rand_M(d, D, seed=D + 1)
    z = torch.randn(2000, d, generator=torch.Generator().manual_seed(2))
    exact = _brute_force(z, M)
    raw = ((z - L.decode(L.encode(z, M, method="pinv", refine=False), M)) ** 2).sum(-1)
    ref = ((z - L.decode(L.encode(z, M, method="pinv", refine=True), M)) ** 2).sum(-1)
    assert bool((ref <= raw + 1e-6).all())
    assert bool((ref >= exact - 1e-5).all())
    assert ref.mean() <= 1.10 * exact.mean()


def test_pre_sign_agrees_with_codes():
    M = _rand_M(4, 8)
    z = torch.randn(100, 4)
    for method in ("pinv", "exhaustive"):
        codes, pre = L.encode(z, M, method=method, return_pre_sign=True)
        assert torch.equal(torch.sign(pre).to(torch.int8), codes)
        assert bool((pre.abs() >= L.PRE_SIGN_FLOOR).all())


def test_encode_rejects_wrong_dim():
    with pytest.raises(ValueError, match="target_dim"):
        L.encode(torch.randn(3, 5), _rand_M(4, 8))


def test_training_lowers_mse():
    spec = L.LatticeSpec.parse("8to4")
    M0 = torch.randn(4, 8, generator=torch.Generator().manual_seed(3)) / 8**0.5
    before = L.gaussian_mse(M0, n=4000, seed=5)
    res = train_projection(spec, steps=150, batch=256, restarts=1, progress=False,
                           n_select=4000, init=M0)
    after = L.gaussian_mse(res.M, n=4000, seed=5)
    assert after < 0.8 * before
    assert after < L.sign_quantization_mse()


def _index():
    return {r["name"]: r for r in json.loads((ROOT / "lattice" / "index.json").read_text())}


def test_shipped_lattices_load_and_beat_sign_quantization():
    names = L.shipped_lattices()
    index = _index()
    assert set(names) == set(index), "lattice/index.json and lattice/*.pt disagree"
    for name in names:
        spec = L.LatticeSpec.parse(name)
        M = torch.load(L.lattice_path(name), weights_only=True)
        assert tuple(M.shape) == (spec.target_dim, spec.lifted_dim)
        assert index[name]["mse"] < L.sign_quantization_mse()
        assert index[name]["n_eval"] >= 100_000


SHIPPED_REQUIRED = ["16to10", "32to20", "16to8", "32to16", "30to14", "18to8", "20to8",
                    "22to8", "24to10", "25to10", "20to10", "24to8"]
# Paper Table 1 (and the authors' released matrices where the paper prints none): ceilings on
# the point estimate. tests/test_lattice_claims.py checks the recorded numbers themselves and
# lattice/README.md states each verdict with its standard error.
MSE_CEILING = {"32to16": 0.082, "30to14": 0.070, "24to10": 0.053, "32to20": 0.146,
               "16to8": 0.089, "20to8": 0.050, "24to8": 0.0256}


# Lattices known to miss their ceiling (kept visible as strict xfails instead of loosening the
# bound). 16to8: 0.09071 +- 0.00018 against the paper's 0.089 (it beats the released 0.092);
# more training on an H200 did not get under 0.0905 (lattice/README.md).
KNOWN_ABOVE_CEILING: set[str] = {"16to8"}


def test_required_lattices_shipped():
    missing = [n for n in SHIPPED_REQUIRED if n not in _index()]
    assert not missing, f"missing lattices: {missing}"


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="above the paper's value"))
    if n in KNOWN_ABOVE_CEILING else n for n in MSE_CEILING])
def test_lattice_within_paper_bound(name):
    mse = _index()[name]["mse"]
    assert mse <= MSE_CEILING[name], (name, mse, MSE_CEILING[name])


@pytest.mark.slow
def test_generator_cli_trains_and_registers(tmp_path):
    out = tmp_path / "6to3.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "lattice_generator.py"), "--D", "6", "--d", "3",
           "--steps", "60", "--restarts", "2", "--n_eval", "100000", "--device", "cpu",
           "--output", str(out), "--no_progress"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    M = torch.load(out, weights_only=True)
    assert M.shape == (3, 6)
    rows = json.loads((tmp_path / "index.json").read_text())
    assert rows[0]["name"] == "6to3" and rows[0]["mse"] < L.sign_quantization_mse()
    bad = subprocess.run([sys.executable, str(ROOT / "lattice_generator.py"), "--expc", "8to9"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "impossible lattice" in bad.stderr


def test_lloyd_least_squares_step_and_improvement():
    """Lloyd polishing beats a random M by a wide margin, never returns a worse matrix than
    its input, and its M-step is the exact least-squares solution for fixed codes."""
    M = _rand_M(4, 8, seed=3)
    best, scores = lloyd_refine(M, iters=3, n=20_000, n_select=5_000, seed=1)
    assert len(scores) == 4 and min(scores) == pytest.approx(
        L.gaussian_mse(best, n=5_000, seed=20_001, method="exhaustive"), rel=1e-6)
    assert scores[-1] < 0.7 * scores[0]  # a random 8to4 matrix is far from a fixed point
    # input already optimal for its codes -> returned unchanged when no iterate beats it
    same, s2 = lloyd_refine(best, iters=0, n=20_000, n_select=5_000, seed=1)
    assert torch.equal(same, best) and s2 == [pytest.approx(min(scores))]
    # the M-step: for fixed codes no perturbation of M lowers the fit error
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4000, 4, generator=g)
    b = L.encode(x, best).double()
    M_ls = torch.linalg.lstsq(b, x.double()).solution.T
    err = lambda m: float((x.double() - b @ m.T).square().mean())
    for _ in range(5):
        assert err(M_ls) <= err(M_ls + 1e-3 * torch.randn(4, 8, generator=g).double())
    with pytest.raises(ValueError):
        lloyd_refine(M, iters=1, n=4)


@pytest.mark.slow
def test_generator_cli_lloyd_polish(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    M = _rand_M(3, 6, seed=2)
    torch.save(M, tmp_path / "start.pt")
    out = tmp_path / "6to3.pt"
    base = [sys.executable, str(ROOT / "lattice_generator.py"), "--D", "6", "--d", "3",
            "--device", "cpu", "--no_progress", "--n_eval", "20000"]
    bad = subprocess.run(base + ["--steps", "0"], check=False, env=env, capture_output=True,
                         text=True,
                         timeout=60)
    assert bad.returncode != 0 and "--init" in bad.stderr
    subprocess.run(base + ["--steps", "0", "--init", str(tmp_path / "start.pt"), "--lloyd", "3",
                           "--lloyd_n", "20000", "--output", str(out)],
                   check=True, env=env, capture_output=True, timeout=120)
    row = json.loads((tmp_path / "index.json").read_text())[0]
    assert row["lloyd"] == 3 and len(row["lloyd_mse"]) == 4 and row["init"] == "start.pt"
    assert row["mse"] < L.gaussian_mse(M, n=20_000, method="exhaustive")


_KERNEL_CHECK = """
import torch
from liftquant.core import lattice as L
from liftquant.kernels.search import search_exhaustive_triton, search_pinv_triton
for d, D, bases in [(4, 8, 1), (6, 12, 2), (3, 7, 1), (8, 12, 1), (10, 14, 1), (6, 7, 1)]:
    g = torch.Generator().manual_seed(D)
    M = torch.randn(d, D, generator=g) / D**0.5
    z = torch.randn(40, d, generator=g)
    z[3] = 0.0  # u = -0.0 in every lane
    dist = lambda c: ((z - L.decode(c, M)) ** 2).sum(-1)
    if D <= 12:
        exact = dist(L._search_exhaustive(z, M))
        torch.testing.assert_close(dist(search_exhaustive_triton(z, M)), exact, atol=1e-5,
                                   rtol=1e-5)
    off = L.padding_offsets(M, bases=bases)
    ref, _ = L._search_pinv(z, M, off)
    # paired (two paddings per tensor-core row), unpaired, and an odd count (unpaired fallback)
    for kw, o in (({}, off), ({"paired": False}, off), ({}, off[:-1])):
        codes, pre = search_pinv_triton(z, M, o, **kw)
        r = ref if o is off else L._search_pinv(z, M, o)[0]
        torch.testing.assert_close(dist(codes), dist(r), atol=1e-5, rtol=1e-5)
        assert torch.equal(torch.where(pre >= 0, 1.0, -1.0), codes)
        # pre is u + the offset of the chosen padding
        u = z @ L.null_space(M)[0].T
        assert ((pre - u)[:, None, :] - o[None]).abs().amax(-1).min(-1).values.max() < 1e-5
print("kernels ok")
"""


@pytest.mark.slow
def test_triton_search_kernels_match_torch():
    """Both fused search kernels, run by Triton's CPU interpreter (a fresh process: the
    interpreter must be on before triton is imported), pick codes exactly as good as the torch
    oracles: the exhaustive kernel the true optimum, the pinv kernels (paired, unpaired, odd
    padding count) the heuristic's best, including paddings fewer than one tile and a zero
    sub-vector (u = -0.0)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "kernels ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["20to8", "24to10", "24to8"])
def test_paired_pinv_kernel_matches_torch_on_cuda(name):
    """The quantizer's search (4 null-space bases) on a shipped lattice: the paired kernel's
    codes are as good as the torch heuristic's and the unpaired kernel's (to float32 rounding),
    its pre-sign values agree with its codes, and it picks the same padding as the unpaired
    kernel wherever their best distances are not within rounding of a tie."""
    from liftquant.kernels.search import search_pinv_triton

    M = L.load_projection(name).cuda()
    d, D = M.shape
    z = torch.randn(6000, d, generator=torch.Generator().manual_seed(1)).cuda()
    z[:7] = 0.0
    off = L.padding_offsets(M, bases=L.search_bases(D, d))
    dist = lambda c: ((z - L.decode(c, M)) ** 2).sum(-1)
    ref = torch.cat([L._search_pinv(z[i:i + 500], M, off)[0] for i in range(0, len(z), 500)])
    c1, p1 = search_pinv_triton(z, M, off)
    c0, p0 = search_pinv_triton(z, M, off, paired=False)
    torch.testing.assert_close(dist(c1), dist(ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dist(c1), dist(c0), atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.where(p1 >= 0, 1.0, -1.0), c1)
    same = (p1 == p0).all(1).float().mean().item()
    assert same > 0.95, same  # the rest: equal-distance candidates (duplicates, near-ties)


def test_search_bases_follow_the_lattice_index(tmp_path):
    from liftquant.core.lattice import SEARCH_BASES, search_bases

    (tmp_path / "index.json").write_text(json.dumps(
        [{"name": "32to16", "bases": 8}, {"name": "16to8", "bases": None}]))
    assert search_bases(32, 16, tmp_path) == 8
    assert search_bases(16, 8, tmp_path) == SEARCH_BASES  # exhaustive entries record none
    assert search_bases(20, 8, tmp_path) == SEARCH_BASES  # not in the index
    (tmp_path / "index.json").write_text("{not json")
    assert search_bases(32, 16, tmp_path) == SEARCH_BASES  # unreadable index: the default
    assert search_bases(32, 16, tmp_path / "missing") == SEARCH_BASES


def test_null_space_cache_never_serves_a_freed_matrix():
    """The cache is keyed by address; a new matrix at a freed one's address must not get the
    old entry (it did: 16to8 candidates measured 0.586 instead of 0.0906 on the GPU)."""
    from liftquant.core.lattice import _null_space, null_space

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        M = torch.randn(4, 8, generator=g)
        got = null_space(M)[1]
        torch.testing.assert_close(got, _null_space(M)[1])
        del M, got


def test_search_launch_tunes_on_a_small_slice_first():
    from liftquant.kernels.search import TUNE_ROWS, _tune_small_first

    calls = []
    _tune_small_first(lambda lo, hi: calls.append((lo, hi)), 3 * TUNE_ROWS + 5)
    assert calls == [(0, TUNE_ROWS), (TUNE_ROWS, 3 * TUNE_ROWS + 5)]
    calls.clear()
    _tune_small_first(lambda lo, hi: calls.append((lo, hi)), 10)
    assert calls == [(0, 10)]
