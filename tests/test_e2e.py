"""e2efinetune.py / liftquant.apps.finetune on a tiny quantized Llama (CPU): codes stay bit-identical,
the loss goes down, the saved checkpoint reloads to the same logits, the seed command parses."""

import json
import shlex

import pytest
import torch

import e2efinetune
from liftquant.apps.finetune import E2EArgs, freeze_packed, make_trainable, train
from liftquant.cli.config import CalibArgs, LatticeArgs, RunConfig, TrainArgs
from liftquant.core.lattice import LatticeSpec, load_projection
from liftquant.core.linear import PackedLiftLinear
from liftquant.io.checkpoint import (
    load_quantized,
    packed_module_names,
    quantization_config,
    save_quantized,
)
from liftquant.models import get_adapter, tiny_llama
from liftquant.quantize.calibrate import quantize_model
from tests import seed_readme
from tests.conftest import make_corpus, make_tokenizer

SPEC = LatticeSpec.parse("8to4")
# the authors' README command, verbatim (tests/seed_readme.py): paths and the lattice
# placeholder ``n`` substituted, nothing else (``--do_train True``, ``--training_strategy`` kept)
SEED_SUBS = {"/path/to/your/Llama-2-7B": "FP", "./Llama-2-7B+n.pth": "Q", "n": "8to4",
             "./output/e2e-qp-output/Llama-2-7B-redpajama-4096": "OUT"}
SEED_ARGV = seed_readme.argv_of(seed_readme.E2E, "e2efinetune.py", SEED_SUBS)


@pytest.fixture(scope="module")
def packed_ckpt(tiny_lattice_dir, tmp_path_factory):
    """A tiny Llama quantized at 8to4 (1 epoch), saved with a tokenizer, plus a corpus file."""
    folder = tmp_path_factory.mktemp("e2e")
    model = tiny_llama(seed=0)
    cfg = RunConfig(calib=CalibArgs(nsamples=8, seqlen=32, batch_size=4, seed=0),
                    lattice=LatticeArgs(expc="8to4"), train=TrainArgs(epochs=1, holdout=2))
    ids = torch.randint(0, model.config.vocab_size, (8, 32),
                        generator=torch.Generator().manual_seed(1))
    M = load_projection(SPEC, tiny_lattice_dir)
    quantize_model(model, ids, cfg=cfg, M=M, spec=SPEC, adapter=get_adapter(model.config),
                   device=torch.device("cpu"))
    qc = quantization_config(spec=SPEC, M=M, quantized_modules=packed_module_names(model),
                             not_converted=["lm_head"])
    save_quantized(model, make_tokenizer(), folder / "q", qconfig=qc, report={"from": "test"})
    (folder / "corpus.txt").write_text(make_corpus())
    return folder


def _cfg(folder, **kw):
    base = {"quant_model_path": str(folder / "q"), "output_dir": str(folder / "out"),
            "dataset": str(folder / "corpus.txt"), "pt_context_len": 32, "max_train_samples": 4,
            "per_device_train_batch_size": 4, "num_train_epochs": 8, "learning_rate": 1e-3,
            "factor_t": 1.0, "factor_a": 1.0, "lr_scheduler_type": "constant",
            "logging_steps": 100, "max_grad_norm": 1.0, "do_train": True, "device": "cpu"}
    return E2EArgs(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(packed_ckpt):
    """(original, fine-tuned in memory, train result, windows): 8 steps on one batch of 4."""
    tok = make_tokenizer()
    orig, _ = load_quantized(packed_ckpt / "q")
    model, _ = load_quantized(packed_ckpt / "q", trainable=True)
    from liftquant.evaluation.data import load_calibration

    cfg = _cfg(packed_ckpt)
    windows = load_calibration(tok, source=cfg.dataset, n_samples=4, seq_len=32, seed=0)
    groups = make_trainable(model)
    res = train(model, windows, cfg, device=torch.device("cpu"), groups=groups)
    freeze_packed(model)
    return orig, model, res, windows, groups


def test_only_continuous_parameters_change(trained):
    orig, model, _, _, groups = trained
    assert {k: len(v) for k, v in groups.items()} == {
        "scales": 14, "transforms": 28, "s1s2": 28}  # 7 linears x 2 layers
    o_state, n_state = orig.state_dict(), model.state_dict()
    assert set(o_state) == set(n_state)  # same keys: the checkpoint format is unchanged
    changed = {k for k in o_state if not torch.equal(o_state[k], n_state[k])}
    for k in o_state:
        assert n_state[k].dtype == o_state[k].dtype, k
        if k.endswith("packed_signs") or not any(k.endswith("." + s) for s in
                                                 ("scale", "s1", "L", "R", "s2_act")):
            assert k not in changed, k  # codes bit-identical; embeddings, norms, head frozen
    assert any(k.endswith(".scale") for k in changed)
    assert any(k.endswith(".R") for k in changed) and any(k.endswith(".s1") for k in changed)
    assert not list(model.parameters()) or not any(p.requires_grad for p in model.parameters())
    assert all(m.packed_signs.dtype == torch.uint8 for m in model.modules()
               if isinstance(m, PackedLiftLinear))


def test_loss_goes_down(trained):
    _, _, res, _, _ = trained
    losses = [h["loss"] for h in res["history"]]
    assert res["gradient_checkpointing"]
    assert res["steps"] == 8 and len(losses) == 8
    assert losses[-1] < losses[0] - 0.05, losses
    print("e2e losses", [round(x, 3) for x in losses])


def test_saved_checkpoint_reloads_to_same_logits(trained, packed_ckpt, tmp_path):
    _, model, _, windows, _ = trained
    qc = dict(model.config.quantization_config)
    save_quantized(model, make_tokenizer(), tmp_path / "ft", qconfig=qc)
    loaded, _ = load_quantized(tmp_path / "ft")
    with torch.no_grad():
        assert torch.equal(loaded(windows[:2]).logits, model(windows[:2]).logits)


def test_cli_end_to_end(packed_ckpt, capsys):
    out = packed_ckpt / "cli"
    rc = e2efinetune.main([
        "--quant_model_path", str(packed_ckpt / "q"), "--output_dir", str(out), "--expc", "8to4",
        "--dataset", str(packed_ckpt / "corpus.txt"), "--do_train", "--pt_context_len", "32",
        "--max_train_samples", "4", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--num_train_epochs", "2", "--learning_rate",
        "1e-4", "--device", "cpu", "--do_ppl_eval", "--ppl_dataset",
        str(packed_ckpt / "corpus.txt"), "--ppl_seqlen", "32", "--eval_dataset_size", "4",
        "--bf16", "--evaluation_strategy", "steps", "--eval_steps", "1"])
    assert rc == 0
    report = json.loads((out / "e2e_report.json").read_text())
    assert report["train"]["steps"] == 2 and report["train"]["compute"] == "float32"
    assert "ppl" in report["train"]["history"][0]  # --evaluation_strategy steps
    assert report["train"]["gradient_checkpointing"]
    assert report["before"]["ppl"] > 1 and report["after"]["ppl"] > 1
    assert "perplexity" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["from"] == "test"  # carried over
    loaded, _ = load_quantized(out)
    orig, _ = load_quantized(packed_ckpt / "q")
    for (k, a), b in zip(loaded.state_dict().items(), orig.state_dict().values()):
        if k.endswith("packed_signs"):
            assert torch.equal(a, b), k


def test_seed_command_parses():
    cfg = e2efinetune.parse(SEED_ARGV)
    assert cfg.expc == "8to4" and cfg.wbits == 2 and cfg.factor_a == 100 and cfg.factor_t == 10
    assert cfg.learning_rate == 2e-5 and cfg.dataset == "redpajama" and cfg.do_train is True
    assert cfg.eval_strategy == "steps" and cfg.eval_steps == 200  # renamed flag is mapped
    assert cfg.pt_context_len == 4096 and cfg.gradient_accumulation_steps == 8
    assert cfg.per_device_train_batch_size == 4 and cfg.eval_batch_size == 4
    assert cfg.eval_max_windows == 64 and cfg.tasks.split(",")[0] == "piqa"
    assert cfg.bf16 and cfg.eval_ppl and cfg.max_grad_norm == 0.3 and cfg.data_seed == 42
    assert (cfg.quant_model_path, cfg.fp_model_path, cfg.output_dir) == ("Q", "FP", "OUT")
    help_text = e2efinetune.build_e2e_parser("x").format_help()
    assert "compat:" in help_text


@pytest.mark.parametrize("argv", [["--quant_model_path", "Q", "--no_such_flag"],
                                  ["--quant_model_path", "Q", "--learning_rat", "1"],
                                  ["--do_train"]])
def test_bad_flags_rejected(argv):
    with pytest.raises(SystemExit):
        e2efinetune.parse(argv)


def test_expc_mismatch_rejected(packed_ckpt, capsys):
    rc = e2efinetune.main(["--quant_model_path", str(packed_ckpt / "q"), "--expc", "9to3",
                           "--output_dir", str(packed_ckpt / "bad"), "--do_train"])
    assert rc == 2 and "does not match" in capsys.readouterr().err


def test_script_commands_parse():
    from tests.test_cli import ROOT, _commands_in, _expand_shell_vars

    found = 0
    for doc in [ROOT / "README.md", *sorted((ROOT / "scripts").glob("*.sh"))]:
        md = doc.suffix == ".md"
        text = doc.read_text() if md else _expand_shell_vars(doc.read_text())
        for args in _commands_in(text, "e2efinetune.py", markdown=md):
            # optional pass-throughs such as $LIMIT (${X:+...}) expand to nothing here
            e2efinetune.parse([a for a in shlex.split(args) if not a.startswith("$")])
            found += 1
    assert found >= 1
