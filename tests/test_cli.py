"""Entry scripts: --help, the seed's commands parse, README/scripts commands parse, and an
end-to-end main.py run on a tiny local model."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main as main_script
from liftquant.cli.config import RunConfig, apply_demo_defaults, build_parser
from tests import seed_readme

ROOT = Path(__file__).resolve().parent.parent
# the authors' README command, verbatim (tests/seed_readme.py); only the paths are substituted
SEED_ARGV = seed_readme.argv_of(seed_readme.MAIN, "main.py",
                                {"/path/to/your/Llama-2-7B": "PATH", "./qmodels": "DIR"})


def _parse(argv):
    ns = build_parser("x").parse_args(argv)
    apply_demo_defaults(ns)
    return RunConfig.from_args(ns)


def test_seed_command_parses_to_the_intended_config():
    cfg = _parse(SEED_ARGV)
    assert cfg.lattice.expc == "20to8" and cfg.lattice.wbits == 2
    assert cfg.calib.nsamples == 4096 and cfg.calib.calib_dataset == "redpajama"
    assert cfg.stage_epochs(1) == cfg.stage_epochs(2) == 2
    assert cfg.train.propagate == "fp" and cfg.train.lw_lr == 2e-5
    assert cfg.train.true_sequential and cfg.train.act_order


def test_stage_overrides_and_bad_flags():
    cfg = _parse(["--model", "m", "--nsamples", "64", "--epochs", "3", "--epochs2", "1",
                  "--stage1_nsamples", "16"])
    assert (cfg.stage_epochs(1), cfg.stage_epochs(2)) == (3, 1)
    assert (cfg.stage_nsamples(1), cfg.stage_nsamples(2)) == (16, 64)
    p = build_parser("x")
    with pytest.raises(SystemExit):
        p.parse_args(["--nsample", "4"])  # abbreviations are off
    with pytest.raises(SystemExit):
        p.parse_args(["--no_such_flag"])
    with pytest.raises(ValueError, match="only 16"):
        _parse(["--model", "m", "--abits", "4"])
    with pytest.raises(ValueError, match="at most one"):
        _parse(["--model", "m", "--expc", "24to8", "--bits", "2.5"])


def test_config_round_trip(tmp_path):
    cfg = _parse(SEED_ARGV)
    f = tmp_path / "run.json"
    f.write_text(json.dumps(cfg.to_dict()))
    again = _parse(["--config", str(f), "--nsamples", "8"])
    assert again.calib.nsamples == 8 and again.lattice.expc == "20to8"


def test_help_runs():
    for script in ("main.py", "lattice_generator.py"):
        out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True,
                             text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0 and "usage" in out.stdout


def _commands_in(text: str, script: str, *, markdown: bool) -> list[str]:
    """Invocations of ``script`` in shell scripts, or in fenced code blocks of Markdown."""
    cmds, in_code = [], not markdown
    for line in text.replace("\\\n", " ").splitlines():
        if markdown and line.strip().startswith("```"):
            in_code = not in_code
            continue
        m = re.search(rf"python3? {re.escape(script)}(.*)$", line.strip())
        if in_code and m:
            args = re.split(r" #|&&|;|\||>|2>|&$", m.group(1))[0]  # drop redirections, chains
            cmds.append(args.strip())
    return cmds


# Values for shell variables that are not given a ${VAR:-default} in the script itself.
SHELL_VARS = {"spec": "24to10", "OUT": "/tmp/x", "name": "run", "SCR": "/tmp/s", "b": "8",
              "L": "/tmp/l", "Q": "/tmp/q", "e": "4"}


def _expand_shell_vars(text: str) -> str:
    values = dict(SHELL_VARS)
    values.update({k: v.strip('"') for k, v in re.findall(r"(\w+)=\$\{\w+:-([^}]*)\}", text)})
    text = text.replace('"$@"', "")  # a wrapper's pass-through arguments
    text = re.sub(r"\$\{\w+:-([^}]*)\}", lambda m: m.group(1).strip('"'), text)  # inline defaults
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def test_readme_and_scripts_commands_parse():
    docs = [ROOT / "README.md", *sorted((ROOT / "scripts").glob("*.sh"))]
    found = 0
    for doc in docs:
        md = doc.suffix == ".md"
        text = doc.read_text() if md else _expand_shell_vars(doc.read_text())
        for args in _commands_in(text, "main.py", markdown=md):
            _parse(shlex.split(args))
            found += 1
        for args in _commands_in(text, "lattice_generator.py", markdown=md):
            import lattice_generator

            lattice_generator.build_parser().parse_args(shlex.split(args))
            found += 1
    assert found >= 2


def test_main_end_to_end_on_tiny_model(tiny_model_dir, tiny_lattice_dir, tmp_path):
    out = tmp_path / "q"
    argv = ["--model", str(tiny_model_dir), "--calib_dataset", str(tiny_model_dir / "corpus.txt"),
            "--eval_ppl", "--eval_dataset", str(tiny_model_dir / "corpus.txt"),
            "--eval_seqlen", "32", "--expc", "8to4", "--lattice_dir", str(tiny_lattice_dir),
            "--nsamples", "6", "--seqlen", "32", "--epochs", "1", "--dtype", "float32",
            "--save_dir", str(out), "--device", "cpu"]
    assert main_script.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["ppl_quantized"] > 1 and len(report["blocks"]) == 2
    assert (out / "liftquant_run.json").is_file() and (out / "quantize.log").is_file()
    assert not (out / "blocks").exists()
    from liftquant.io.checkpoint import load_quantized

    model, tok = load_quantized(out)
    assert tok is not None
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_main_rejects_missing_model_and_unknown_arch(tmp_path):
    with pytest.raises(FileNotFoundError):  # --debug: the exception, not the one-line error
        main_script.main(["--model", str(tmp_path / "missing"), "--save_dir", str(tmp_path / "o"),
                          "--device", "cpu", "--debug"])
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "odd")
    with pytest.raises(ValueError, match="gpt2.*llama|llama.*gpt2"):
        main_script.main(["--model", str(tmp_path / "odd"), "--save_dir", str(tmp_path / "o2"),
                          "--device", "cpu", "--debug"])
