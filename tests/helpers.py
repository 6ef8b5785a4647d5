"""Small assertion helpers shared by the tests (importable: pytest puts tests/ on sys.path)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float = 1e-10, rtol: float = 0
) -> None:
    """Max-abs-error check (cheaper to import than torch.testing, whose first call costs ~1 s)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= atol + rtol * expected.abs().max().item(), f"max abs error {err:.3g}"


# A stand-in CUDA driver so ``JITFunction.warmup`` compiles Triton kernels for sm_90 on a machine
# without a GPU (prepended to the script given to :func:`run_sm90_build`).
SM90_STANDIN = textwrap.dedent("""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class StandIn:  # enough of a CUDA driver for JITFunction.warmup to compile, not launch
        def get_current_device(self): return 0
        def get_current_stream(self, device=None): return 0
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_device_interface(self): return torch.cuda
        def get_active_torch_device(self): return torch.device("cpu")

    try:
        driver.set_active(StandIn())
    except Exception as err:
        print("skip", err); raise SystemExit(0)
""")


def run_sm90_build(body: str) -> None:
    """Run ``body`` (dedented Python that compiles kernels with ``warmup`` and prints ``ok``)
    after :data:`SM90_STANDIN` in a fresh interpreter without the Triton interpreter; skip
    when Triton's NVIDIA backend or the stand-in driver is unavailable."""
    import pytest

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", SM90_STANDIN + textwrap.dedent(body)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
                          check=False)
    if proc.stdout.startswith("skip"):
        pytest.skip(proc.stdout)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-4000:]
