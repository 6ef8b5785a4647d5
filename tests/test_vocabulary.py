"""One config vocabulary: the authors' three README commands parse from their verbatim text,
booleans read both ways (HF-Trainer ``--do_train True`` and flag ``--do_train``), descriptive
flags and the authors' spellings set the same field, the shared groups are one definition, and
a bad ``--lattice`` is refused before torch (let alone a model) is imported."""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import e2efinetune
from liftquant.apps.finetune import E2EArgs
from liftquant.cli.config import (
    DeviceArgs,
    EvalArgs,
    KernelArgs,
    ModelArgs,
    RunArgs,
    RunConfig,
    apply_demo_defaults,
    build_parser,
)
from tests import seed_readme

ROOT = Path(__file__).resolve().parent.parent


def _main_cfg(argv):
    ns = build_parser("x").parse_args(argv)
    apply_demo_defaults(ns)
    return RunConfig.from_args(ns)


def _e2e(*extra):
    return e2efinetune.parse(["--quant_model_path", "Q", *extra])


# ------------------------------------------------------------------- the seed README commands
def test_seed_main_command_parses_verbatim():
    argv = seed_readme.argv_of(seed_readme.MAIN, "main.py",
                               {"/path/to/your/Llama-2-7B": "/models/llama", "./qmodels": "q"})
    cfg = _main_cfg(argv)
    assert (cfg.model.model, cfg.run.save_dir, cfg.lattice.expc) == ("/models/llama", "q", "20to8")
    assert cfg.run.eval_ppl and cfg.train.true_sequential and cfg.whiten.Rres_init == "Hadamard"
    assert (cfg.train.lexw_lr, cfg.train.lw_lr, cfg.train.la_lr) == (2e-2, 2e-5, 2e-3)


def test_seed_e2e_command_parses_verbatim():
    subs = {"/path/to/your/Llama-2-7B": "FP", "./Llama-2-7B+n.pth": "Q", "n": "20to8",
            "./output/e2e-qp-output/Llama-2-7B-redpajama-4096": "OUT"}
    cfg = e2efinetune.parse(seed_readme.argv_of(seed_readme.E2E, "e2efinetune.py", subs))
    assert cfg.do_train is True and cfg.bf16 is True and cfg.eval_ppl is True
    assert cfg.expc == "20to8" and cfg.training_strategy == "epochs"


def test_seed_e2e_placeholder_lattice_is_refused_in_one_line(capsys):
    """Unsubstituted, the README's ``--expc n`` is the only thing refused, by name."""
    subs = {"/path/to/your/Llama-2-7B": "FP", "./Llama-2-7B+n.pth": "Q"}
    with pytest.raises(SystemExit) as exc:
        e2efinetune.parse(seed_readme.argv_of(seed_readme.E2E, "e2efinetune.py", subs))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: --lattice/--expc: cannot parse lattice 'n'"), err


def test_seed_chat_command_parses_verbatim():
    from liftquant.apps.chat import parse_args

    args, prompts = parse_args(seed_readme.argv_of(
        seed_readme.CHAT, "chat/chat_bitblas_compile.py",
        {"/path/to/your/fp_hf_model": "FP", "/path/to/your/quant_checkpoint": "Q"}))
    assert (args.fp_model_path, args.quant_model_path, prompts) == ("FP", "Q", None)


# ------------------------------------------------------------------------------- booleans
@pytest.mark.parametrize(("argv", "do_train", "bf16"), [
    (["--do_train"], True, None),
    (["--do_train", "True"], True, None),
    (["--do_train", "true", "--bf16", "False"], True, False),
    (["--do_train", "False", "--bf16", "1"], False, True),
    (["--no-do_train", "--bf16", "no"], False, False),
])
def test_booleans_both_ways(argv, do_train, bf16):
    cfg = _e2e(*argv)
    assert cfg.do_train is do_train
    assert cfg.bf16 is (E2EArgs.bf16 if bf16 is None else bf16)


@pytest.mark.parametrize("argv", [["--do_train", "maybe"], ["--no-bf16", "True"]])
def test_bad_boolean_values_rejected(argv, capsys):
    with pytest.raises(SystemExit):
        _e2e(*argv)
    err = capsys.readouterr().err
    assert "expected True or False" in err or "takes no value" in err, err


def test_main_booleans_both_ways():
    cfg = _main_cfg(["--model", "m", "--eval_ppl", "False", "--w_sym", "True",
                     "--true-sequential", "--no-finetuning_weights"])
    assert not cfg.run.eval_ppl and cfg.lattice.w_sym and cfg.train.true_sequential
    assert cfg.train.finetuning_weights is False


# -------------------------------------------------------------------- descriptive spellings
def test_descriptive_flags_and_author_spellings_are_one_field():
    new = _main_cfg(["--model", "m", "--lattice", "24to8", "--rotation_init", "dct",
                     "--lr_signs", "1e-5", "--lr_rotation", "0.5", "--lr_channel_scales", "0.25",
                     "--lr_row_scales", "0.125", "--lr_transform", "3e-4"])
    old = _main_cfg(["--model", "m", "--expc", "24to8", "--Rres_init", "dct", "--lw_lr", "1e-5",
                     "--lexw_lr", "0.5", "--la_lr", "0.25", "--lscale_lr", "0.125",
                     "--lt_lr", "3e-4"])
    assert new.to_dict() == old.to_dict()
    assert new.lattice.expc == "24to8" and new.train.lw_lr == 1e-5
    e2e = _e2e("--lattice", "24to8", "--lr_factor_transform", "3", "--lr_factor_channel_scales",
               "7")
    assert (e2e.expc, e2e.factor_t, e2e.factor_a) == ("24to8", 3, 7)


def test_help_lists_the_descriptive_flag_first():
    text = build_parser("x").format_help()
    assert "--lattice LATTICE, --expc LATTICE" in text
    assert "--lr_signs LR_SIGNS, --lw_lr LR_SIGNS" in text


# ----------------------------------------------------------------------------- shared groups
def test_shared_groups_are_one_definition():
    for shared, users in ((DeviceArgs, (ModelArgs, E2EArgs)),
                          (KernelArgs, (RunArgs, E2EArgs)),
                          (EvalArgs, (RunArgs, E2EArgs))):
        for cls in users:
            assert issubclass(cls, shared), (cls, shared)
    spec = importlib.util.spec_from_file_location("lq_script_eval", ROOT / "scripts" / "eval.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through it
    spec.loader.exec_module(mod)
    assert issubclass(mod.EvalScriptArgs, EvalArgs) and issubclass(mod.EvalScriptArgs, KernelArgs)
    # the same evaluation spellings parse in main.py and e2efinetune.py
    argv = ["--do_ppl_eval", "--eval_dataset_size", "3", "--per_device_eval_batch_size", "5",
            "--eval_tasks", "boolq", "--backend", "torch", "--device", "cpu"]
    main_cfg, e2e = _main_cfg(["--model", "m", *argv]), _e2e(*argv)
    for f in dataclasses.fields(EvalArgs):
        assert getattr(main_cfg.run, f.name) == getattr(e2e, f.name), f.name
    assert main_cfg.run.backend == e2e.backend == "torch"
    assert main_cfg.model.device == e2e.device == "cpu"


def test_config_json_keys_stay_field_names(tmp_path):
    cfg = _main_cfg(["--model", "m", "--lattice", "24to8", "--lr_signs", "1e-5"])
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["lattice"]["expc"] == "24to8" and d["train"]["lw_lr"] == 1e-5
    assert RunConfig.from_dict(d) == cfg


# ------------------------------------------------------------- lattice checked before loading
@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--lattice", "24x8", "--lattice/--expc: cannot parse lattice '24x8'"),
    ("--expc", "26to10", "python lattice_generator.py --expc 26to10"),
])
def test_bad_lattice_refused_before_torch_and_model(tmp_path, flag, value, message):
    """A model folder whose config.json is garbage would fail (slowly, with another message) if
    it were read; the lattice is refused first, and torch itself is never imported."""
    fake = tmp_path / "model"
    fake.mkdir()
    (fake / "config.json").write_text("{ not json")
    code = ("import sys, main\n"
            f"rc = main.main(['--model', {str(fake)!r}, {flag!r}, {value!r}, "
            f"'--save_dir', {str(tmp_path / 'out')!r}])\n"
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.stdout.split() == ["2", "False", "False"], (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert not (tmp_path / "out").exists()


def test_e2e_bad_lattice_refused_at_parse(capsys):
    with pytest.raises(SystemExit):
        _e2e("--lattice", "8to8")
    assert "--lattice/--expc: impossible lattice 8to8" in capsys.readouterr().err


def test_e2e_bad_lattice_refused_before_torch(tmp_path):
    code = ("import sys, e2efinetune\n"
            "try:\n"
            f"    e2efinetune.main(['--quant_model_path', {str(tmp_path)!r}, '--lattice', '8x8',\n"
            f"                      '--output_dir', {str(tmp_path / 'out')!r}, '--do_train'])\n"
            "except SystemExit as exc:\n"
            "    print(exc.code, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.stdout.split() == ["2", "False"], (out.stdout, out.stderr)
    assert "--lattice/--expc: cannot parse lattice '8x8'" in out.stderr
    assert not (tmp_path / "out").exists()
