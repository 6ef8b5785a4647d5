"""Build gemm_small's kernel for sm_90 on a machine without a GPU (tests/helpers.SM90_STANDIN)
and count, in the SASS, the wgmma instructions, the waits on them and the block barriers.

    PYTHONPATH=. python bench/kernels/history/sm90_build_c5c3a88/count_sass.py
"""
import os
import subprocess
import sys
import tempfile
import textwrap

sys.path.insert(0, "tests")
from helpers import SM90_STANDIN  # noqa: E402

BODY = textwrap.dedent('''
    import os, subprocess, triton
    from liftquant.kernels import gemm_small as gs
    N, K = 4096, 10240
    XS = torch.zeros(64 * K, dtype=torch.bfloat16)
    W = torch.zeros(N * K // 32, dtype=torch.int32)
    SC = torch.zeros(N, dtype=torch.bfloat16); OUT = torch.zeros(64 * N, dtype=torch.bfloat16)
    PART = torch.zeros(16)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    configs = [("planner WORD_ROWS", gs.WORD_ROWS),
               ("bm64 tok 64x128", gs.GemmSmallConfig(block_m=64, block_n=64, block_k=128,
                                                      swap=False, split=8))]
    for name, c in configs:
        k = gs._gemm_small_kernel.warmup(
            XS, W, SC, SC, PART, OUT, 4, N, K, K // 32, 1280, HAS_BIAS=False, BM=c.block_m,
            BN=c.block_n, BK=c.block_k, DIRECT=False, SWAP=c.swap, PAIRS=c.pairs, USE_ASM=True,
            ONE=0x3F80, ALIGNED=True, num_warps=c.num_warps, num_stages=c.num_stages, grid=(1,))
        path = "/tmp/_gs.cubin"
        open(path, "wb").write(k.asm["cubin"])
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
        print(f"{name}: {c.label}: HGMMA {sass.count('HGMMA')}, HMMA {sass.count('HMMA')}, "
              f"WARPGROUP.DEPBAR {sass.count('WARPGROUP.DEPBAR')}, BAR.SYNC {sass.count('BAR.SYNC')}, "
              f"shared {k.metadata.shared} B")
    print("ok")
''')

with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write(SM90_STANDIN + BODY)
env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
sys.exit(subprocess.call([sys.executable, f.name], env=env))
