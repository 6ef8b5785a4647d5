"""Fast feedback: the package imports without transformers (and main.py's parser without
torch), and the slow-tier list in conftest.py names tests that exist."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SLOW_ELSEWHERE

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_package_and_light_modules_do_not_import_transformers():
    assert _run("import sys, liftquant, liftquant.core.pack, liftquant.core.lattice, liftquant.cli.config\n"
                "print('transformers' in sys.modules)") == ["False"]


def test_main_parser_and_lattice_names_do_not_import_torch():
    assert _run("import sys, main, liftquant.core.latticespec, liftquant.util.errors\n"
                "main.build_parser('x').format_help()\n"
                "print('torch' in sys.modules)") == ["False"]


@pytest.mark.slow
def test_quantizer_registered_once_transformers_is_imported():
    """``import liftquant`` first, transformers later: from_pretrained still knows liftquant."""
    assert _run("import sys, liftquant\n"
                "assert 'transformers' not in sys.modules\n"
                "import transformers\n"
                "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q\n"
                "print('liftquant' in Q)") == ["True"]
    # in this process both are imported, in whichever order the test modules chose
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    import liftquant  # noqa: F401

    assert "liftquant" in AUTO_QUANTIZER_MAPPING


def test_lazy_exports_resolve():
    import liftquant

    for name in liftquant.__all__:
        assert getattr(liftquant, name) is not None, name


def test_slow_list_names_existing_tests():
    for file, func in SLOW_ELSEWHERE:
        tree = ast.parse((ROOT / "tests" / file).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert func in names, f"tests/conftest.py SLOW_ELSEWHERE: {file}::{func} is gone"
