"""The RTN/GPTQ baselines are split by responsibility (issue 17): the math
(:mod:`liftquant.core.baseline_math`) imports neither the loop (:mod:`liftquant.quantize`) nor the
checkpoint format (:mod:`liftquant.io`), even inside functions; the format imports no pipeline;
and ``liftquant.quantize.baselines`` still serves every name of the earlier single module, as the
very same objects, with the stored bit-plane layout unchanged."""

import ast
import subprocess
import sys
from pathlib import Path

import torch

from liftquant.core import baseline_math
from liftquant.io import baseline_format
from liftquant.quantize import baselines
from liftquant.quantize.methods import get_method

PKG = Path(__file__).resolve().parent.parent / "liftquant"

MATH_NAMES = ("BaselineSpec", "_pack_planes", "_unpack_planes", "QuantizedWeight", "minmax_params",
              "quantize_codes", "rtn_quantize", "_inverse_cholesky_upper", "gptq_quantize",
              "quantize_weight", "METHODS", "BITS_RANGE", "SCALE_MIN", "BLOCK_SIZE",
              "FIRST_TOKEN_WEIGHT", "DAMP_RETRIES", "SCALE_BITS", "GIDX_BITS")
FORMAT_NAMES = ("quantization_config", "storage_bits", "checkpoint_tensors",
                "read_quantization_config", "load_baseline", "QUANT_METHOD", "FORMAT_VERSION",
                "PACK_LAYOUT")
LOOP_NAMES = ("_StopBlock", "_group_hessian", "_propagate", "_set_weight", "quantize_baseline",
              "quantize_run", "config_from_run", "_load", "load_checkpoint", "logger")


def _liftquant_imports(path: Path) -> set[str]:
    """Every liftquant module ``path`` imports, at top level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m == "liftquant" or m.startswith("liftquant.")}


def test_math_imports_only_core_and_util():
    deps = _liftquant_imports(PKG / "core" / "baseline_math.py")
    assert deps, "expected the bit layout of liftquant.core.pack"
    bad = {d for d in deps if not d.startswith(("liftquant.core.", "liftquant.util."))}
    assert not bad, f"liftquant.core.baseline_math imports {sorted(bad)}"


def test_format_imports_no_pipeline():
    deps = _liftquant_imports(PKG / "io" / "baseline_format.py")
    bad = {d for d in deps if d.startswith(("liftquant.quantize", "liftquant.evaluation",
                                            "liftquant.apps", "liftquant.engine"))}
    assert not bad, f"liftquant.io.baseline_format imports {sorted(bad)}"


def test_importing_the_math_loads_neither_the_loop_nor_io():
    code = ("import sys, liftquant.core.baseline_math; "
            "print(sorted(m for m in sys.modules if m.startswith(('liftquant.quantize', "
            "'liftquant.io'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "[]", out


def test_old_module_serves_every_name_as_the_same_object():
    for name in MATH_NAMES:
        assert getattr(baselines, name) is getattr(baseline_math, name), name
    for name in FORMAT_NAMES:
        assert getattr(baselines, name) is getattr(baseline_format, name), name
    for name in LOOP_NAMES:
        assert hasattr(baselines, name), name
    for method in ("rtn", "gptq"):
        m = get_method(method)
        assert m.config_type is baselines.BaselineSpec and m.quant_method == "liftquant-baseline"
        assert m.quantization_config is baseline_format.quantization_config
        assert m.quantize is baselines.quantize_run and m.load is baselines._load


def test_bit_planes_are_the_stored_layout():
    """Known answer: codes 0..7 at 3 bits -> plane i holds bit i, LSB first along k."""
    codes = torch.arange(8, dtype=torch.uint8)[None]  # (1, 8)
    packed = baseline_math._pack_planes(codes, 3)  # (3, 1, 1)
    assert packed.dtype == torch.uint8 and packed.flatten().tolist() == [0xAA, 0xCC, 0xF0]
    assert torch.equal(baseline_math._unpack_planes(packed, 8), codes)
    assert (baseline_format.QUANT_METHOD, baseline_format.FORMAT_VERSION,
            baseline_format.PACK_LAYOUT) == ("liftquant-baseline", 1, "bitplanes_lsb_first_v1")
