"""The split-K decode GEMV and the GEMV tuner on CPU.

* The kernel's arithmetic (both word loops, the hoisted correction, the cross-program partial
  sums and the last-arriving reduction) under ``TRITON_INTERPRET=1``, against the float64
  dense layer: split factors that do and do not divide the packed width, rows per program
  that do not divide the rows, aligned and unaligned rows, batch 2, fp16 and bf16 outputs.
* The tuner's bookkeeping with a fake launcher: candidates that fail to build or disagree
  are skipped, the fastest survivor is kept, the plain loop replaces inline PTX that no
  candidate could build.
* The inline-PTX kernels build for sm_90 (H100) with the Triton of this environment: compiled
  ahead of time against a stand-in driver, so no GPU is needed (skipped when the NVIDIA
  backend or its ptxas is missing).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import run_sm90_build

from liftquant.kernels import gemv_tuner
from liftquant.kernels.gemv_rowtile import GemvConfig
from liftquant.kernels.gemv_splitk import SplitKConfig
from liftquant.kernels.int1_words import HAS_TRITON

ROOT = Path(__file__).resolve().parent.parent
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


def _run_interpreted(script: str, timeout: int = 240) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.stdout[-2000:]
                                                          + proc.stderr[-3000:])


SPLITK_CHECK = textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    from liftquant.kernels import gemv_splitk as gs, torch_ref, triton_int1 as ti
    from tests.test_kernels import rand_layer, rel_err

    # (n, N, lattice, out dtype, bias, batch, configs (block_w, block_n, rows/program, loop));
    # packed widths KW = 15 (unaligned rows), 16 (aligned), 13 (unaligned)
    CASES = [
        (200, 13, "24to10", torch.bfloat16, True, 2,
         [(4, 2, 4, "v2"), (8, 4, 8, "v1"), (16, 2, 6, "v2")]),
        (256, 12, "16to8", torch.float16, False, 1,
         [(4, 2, 6, "v2"), (8, 4, 4, "v1"), (32, 4, 12, "v2")]),
        (130, 10, "24to8", torch.float16, True, 1, [(4, 4, 8, "v2")]),
    ]
    seen = set()
    for n, N, spec, dtype, bias, batch, cfgs in CASES:
        layer = rand_layer(n, N, spec, bias=bias, seed=n)
        side = (layer.s1, layer.L, layer.R, layer.s2_act)
        x = torch.randn(batch, n).half()  # the interpreter mishandles bf16 inside T*
        xp, wsc = ti.launch_transform(x, *side, d=layer.spec.target_dim,
                                      D=layer.spec.lifted_dim, pairs=True)
        dense = torch_ref.dense_linear(layer, x.float())
        KW = xp.shape[-1]
        for block_w, block_n, rpp, loop in cfgs:
            cfg = gs.SplitKConfig(block_w, block_n, rpp, 1, word_loop=loop)
            seen.add((cfg.split(KW), KW % block_w == 0))
            out = gs.launch_gemv_splitk(xp, wsc, layer.packed_signs, layer.scale, layer.bias,
                                        dtype, cfg=cfg)
            err = rel_err(out, dense)
            tol = 8e-3 if dtype == torch.bfloat16 else 3e-3  # output rounding: 2^-9 vs 2^-12
            assert out.dtype == dtype and err < tol, (spec, cfg, err)
            counters = gs.WORKSPACES.current["cpu"][1]
            assert int(counters.abs().sum()) == 0, "counters must be reset by the last program"
    assert {(1, False), (2, False), (4, False), (4, True)} <= seen, seen  # splits covered

    # The custom op through the Triton backend (a policy per GEMV kind, no one-launch small
    # path): heuristic split-K, then the row tile; each backend's own tuner records its choice.
    from liftquant.kernels import registry
    from liftquant.kernels.policy import default_policy
    for kind, label in (("auto", "splitk"), ("rowtile", "rowtile")):
        policy = default_policy().replace(gemv_kind=kind, fused_small="0")
        layer = rand_layer(200, 13, "24to10", bias=True, seed=1)
        registry.set_backend(layer, "triton", policy=policy)
        x = torch.randn(1, 200).half()
        err = rel_err(layer(x), torch_ref.dense_linear(layer, x.float()))
        assert err < 3e-3, (kind, err)
        tuner = registry.get_backend("triton", "cpu", policy=policy).tuner
        assert [tuner.cache.lookup(k).label.split(":")[0] for k in tuner.cache.keys()] == [label]
    print("ok")
""")


@needs_triton
def test_splitk_gemv_matches_reference_in_interpreter():
    _run_interpreted(SPLITK_CHECK)


def test_rows_per_program_and_candidates():
    for N, KW in [(4096, 308), (14336, 1076), (1024, 320), (9, 3)]:
        cands = gemv_tuner.splitk_candidates(N=N, KW=KW, n_sm=132, use_asm=True)
        assert len(cands) == len(set(cands)) >= len(gemv_tuner.SPLITK_VARIANTS)
        for c in cands:
            assert c.rows_per_program % c.block_n == 0 and c.rows_per_program >= c.block_n
            assert c.rows_per_program <= -(-N // c.block_n) * c.block_n
            assert c.split(KW) == -(-KW // c.block_w)
    rpp = gemv_tuner.rows_per_program(N=14336, split=5, block_n=16, num_warps=4, n_sm=132,
                                      warps_per_sm=16)
    programs = 5 * -(-14336 // rpp)
    assert abs(programs * 4 / 132 - 16) < 2  # about 16 warps per SM


def test_tuner_skips_failed_and_wrong_candidates(monkeypatch):
    import triton.testing

    tuner = gemv_tuner.GemvTuner()
    key = (64, 40, True, torch.bfloat16, False, "cpu", "auto")
    cands = tuner.candidates(key, 132, True)
    assert isinstance(cands[0], GemvConfig)  # the validated kernel is the reference
    assert any(isinstance(c, SplitKConfig) for c in cands)
    broken, wrong = cands[1], cands[2]
    fast = cands[-1]
    truth = torch.randn(1, 64)

    def fake_launch(cfg, *args, **kwargs):
        if cfg == broken:
            raise RuntimeError("ptxas fatal: unresolved")
        return truth * (5.0 if cfg == wrong else 1.0)

    def fake_bench(fn, **kwargs):  # fn is ``lambda c=cfg: launch_config(c, *args)``
        fn()
        return 0.5 if fn.__defaults__[0] == fast else 1.0

    monkeypatch.setattr(gemv_tuner, "launch_config", fake_launch)
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    xp = torch.zeros(1, 16, 40, dtype=torch.int32)
    packed = torch.zeros(64, 160, dtype=torch.uint8)
    args = (xp, torch.zeros(1, 40), packed, torch.ones(64), None, torch.bfloat16)
    best = tuner.tune(args, key=key, n_sm=132)
    assert best == fast
    assert set(tuner.rejected[key]) == {broken.label, wrong.label}
    assert "ptxas" in tuner.rejected[key][broken.label]
    assert len(tuner.timings[key]) == len(cands) - 2

    def asm_broken(cfg, *args, **kwargs):  # no inline-PTX candidate builds: the plain loops are timed
        if cfg.use_asm:
            raise RuntimeError("inline asm rejected")
        return truth

    monkeypatch.setattr(gemv_tuner, "launch_config", asm_broken)
    tuner2 = gemv_tuner.GemvTuner()
    with pytest.warns(RuntimeWarning, match="plain Triton"):
        best = tuner2.tune(args, key=key, n_sm=132)
    assert not best.use_asm and tuner2.asm_failed


def test_gemv_kind_from_the_policy():
    xp, packed = torch.zeros(1, 16, 40, dtype=torch.int32), torch.zeros(64, 160, dtype=torch.uint8)
    tuner = gemv_tuner.GemvTuner(kind="rowtile")
    key = tuner.key(xp, packed, None, torch.float16)
    assert all(isinstance(c, GemvConfig) for c in tuner.candidates(key, 132, True))
    tuner = gemv_tuner.GemvTuner(kind="splitk")
    key = tuner.key(xp, packed, None, torch.float16)
    assert all(isinstance(c, SplitKConfig) for c in tuner.candidates(key, 132, True))
    with pytest.raises(ValueError, match="rowtile"):
        gemv_tuner.GemvTuner(kind="nope")
    from liftquant.kernels import registry
    from liftquant.kernels.policy import KernelPolicy

    backend = registry.TritonBackend(KernelPolicy(gemv_kind="splitk", tune=False))
    assert backend.tuner.kind == "splitk" and not backend.tuner.tune_enabled
    assert gemv_tuner.tuner_by_id(backend.tuner_id) is backend.tuner
    assert gemv_tuner.tuner_by_id(-1) is gemv_tuner.GEMV_TUNER
    assert backend.tuner.workspaces is backend.workspaces


SM90_BUILD = """
    from liftquant.kernels import gemv_rowtile as gr, gemv_splitk as gs, gemv_tuner as gt
    from liftquant.kernels import triton_int1 as ti

    N, KW = 4096, 308
    W = torch.zeros(N * KW + 64, dtype=torch.int32)
    XP, XSC = torch.zeros(16 * KW, dtype=torch.int32), torch.zeros(KW)
    SC, OUT = torch.zeros(N, dtype=torch.float16), torch.zeros(N, dtype=torch.bfloat16)
    PART, CNT = torch.zeros(16), torch.zeros(16, dtype=torch.int32)
    built = 0
    for aligned in (True, False):
        RS = KW if aligned else KW * 4 + 2
        variants = gt.SPLITK_VARIANTS if aligned else gt.SPLITK_VARIANTS[:1]
        for block_w, block_n, warps, loop in variants:
            k = gs._splitk_kernel.warmup(
                W, XP, XSC, SC, SC, OUT, PART, CNT, N, N, 0, KW, -(-KW // 4), RS, 1024, 64, 5,
                HAS_BIAS=True, ALIGNED=aligned, USE_ASM=True, V1=loop == "v1", BN=block_n,
                BW=block_w, RC=gs.REDUCE_ROWS, num_warps=warps, grid=(1,), PDL=True,
                launch_pdl=True)
            ptx = k.asm["ptx"]
            assert "ld.global.v4.b32" in ptx, "weights must load as 16-byte vectors"
            assert "atom.global.gpu.acq_rel.add" in ptx and "fence.acq_rel.gpu" in ptx
            # PDL: the first weights load before the wait, activations after it
            head, tail = ptx.split("griddepcontrol.wait", 1)
            assert "ld.global.v4.b32" in head and "ld.global" in tail
            built += 1
        k = gr._gemv_kernel.warmup(W, XP, XSC, SC, SC, OUT, N, KW, RS, 1024, HAS_BIAS=True,
                                   ALIGNED=aligned, USE_ASM=True, BN=2, BW=128, num_warps=1,
                                   grid=(1,), PDL=True, launch_pdl=True)
        assert "griddepcontrol.wait" in k.asm["ptx"]
    # T*: lets its GEMV launch at once, waits before it reads x
    X, S1 = torch.zeros(576, dtype=torch.bfloat16), torch.zeros(576, dtype=torch.bfloat16)
    L, R = torch.zeros(24 * 24, dtype=torch.bfloat16), torch.zeros(24 * 60, dtype=torch.bfloat16)
    S2, OUTP, WSC = torch.zeros(24 * 3), torch.zeros(16 * 2 * 45, dtype=torch.float16), torch.zeros(45)
    k = ti._transform_kernel.warmup(
        X, S1, L, R, S2, OUTP, WSC, X, S1, X, 1e-5, PRO=1, n=576, n1=24, n2=24, C=60, D=20, K=1440, KW=45, N1P=32,
        N2P=32, CP=64, BR=16, BK1=32, CC=64, WT=32, PAIRS=True, PDL=True, EARLY=True,
        launch_pdl=True,
        num_warps=4, grid=(1,))
    ptx = k.asm["ptx"]
    assert ptx.index("griddepcontrol.launch_dependents") < ptx.index("griddepcontrol.wait")
    print("ok", built)
"""


@needs_triton
def test_inline_ptx_kernels_build_for_sm90():
    run_sm90_build(SM90_BUILD)


def test_split_k_needs_a_clear_win_over_the_row_tile():
    rt_a = GemvConfig(block_n=2, block_w=128, num_warps=1)
    rt_b = GemvConfig(block_n=4, block_w=128, num_warps=1)
    sk = SplitKConfig(block_w=64, block_n=16, rows_per_program=32, num_warps=4)
    assert gemv_tuner.pick_fastest({rt_a: 10.0, rt_b: 12.0, sk: 9.8}) == rt_a  # 2 % is noise
    assert gemv_tuner.pick_fastest({rt_a: 10.0, rt_b: 12.0, sk: 9.0}) == sk
    assert gemv_tuner.pick_fastest({rt_a: 10.0, sk: 11.0}) == rt_a
    assert gemv_tuner.pick_fastest({sk: 11.0}) == sk  # LIFTQUANT_GEMV=splitk: no row tile
