"""The chat's flags are the one config vocabulary (issue 17): ``--device`` and ``--backend`` are
the shared groups of :mod:`liftquant.cli.config`, not a second declaration, and every chat
command of the README (plus the seed's) still parses as written."""

import dataclasses
import shlex
from pathlib import Path

from liftquant.apps.chat import ChatArgs, parse_args
from liftquant.cli.config import DeviceArgs, KernelArgs
from tests import seed_readme
from tests.test_cli import _commands_in

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "chat/chat_bitblas_compile.py"


def test_chat_reuses_the_shared_groups():
    assert issubclass(ChatArgs, DeviceArgs) and issubclass(ChatArgs, KernelArgs)
    chat = {f.name: f for f in dataclasses.fields(ChatArgs)}
    for shared in (DeviceArgs, KernelArgs):
        for f in dataclasses.fields(shared):
            assert chat[f.name].metadata is f.metadata, f.name  # inherited, not redeclared


def test_readme_chat_commands_parse_as_written():
    cmds = _commands_in((ROOT / "README.md").read_text(), SCRIPT, markdown=True)
    assert len(cmds) >= 3
    for cmd in cmds:
        args, _ = parse_args(shlex.split(cmd))
        assert args.quant_model_path == "out/demo"
    args, prompts = parse_args(shlex.split(cmds[1]))
    assert prompts == ["What is a lattice?", "Shorter, please."]
    args, _ = parse_args(shlex.split(cmds[2]))
    assert (args.do_sample, args.top_k, args.max_new_tokens) == (True, 50, 128)
    seed, _ = parse_args(seed_readme.argv_of(seed_readme.CHAT, SCRIPT, {
        "/path/to/your/fp_hf_model": "FP", "/path/to/your/quant_checkpoint": "Q"}))
    assert (seed.device, seed.backend) == ("auto", "auto")


def test_shared_flags_parse_in_the_chat():
    args, _ = parse_args(["--quant_model_path", "Q", "--device", "cuda:1", "--backend", "bitblas"])
    assert (args.device, args.backend) == ("cuda:1", "bitblas")
