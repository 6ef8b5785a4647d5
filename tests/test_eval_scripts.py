"""scripts/eval.py and scripts/pareto.py on a tiny local model; CSV writer and headless plot."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import main as main_script
from liftquant.evaluation import pareto

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"lq_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)
    return module


def _data_flags(folder: Path) -> list[str]:
    corpus = str(folder / "corpus.txt")
    return ["--calib_dataset", corpus, "--eval_dataset", corpus, "--eval_seqlen", "32",
            "--eval_max_windows", "6", "--nsamples", "4", "--seqlen", "32", "--dtype", "float32",
            "--device", "cpu"]


def test_main_gptq_then_eval_script(tiny_model_dir, tmp_path):
    out = tmp_path / "gptq"
    argv = ["--model", str(tiny_model_dir), *_data_flags(tiny_model_dir), "--method", "gptq",
            "--baseline_bits", "3", "--group_size", "32", "--act-order", "--eval_ppl",
            "--save_dir", str(out)]
    assert main_script.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "liftquant-baseline" and qc["name"] == "gptq-w3g32-act"
    assert report["summary"]["method"] == "gptq" and report["calib_tokens"] == 4 * 32
    assert report["bits"]["quantized_linears"]["bpw_codes"] == 3.0
    result_file = tmp_path / "eval.json"
    corpus = str(tiny_model_dir / "corpus.txt")
    assert _script("eval").main(["--quant_model_path", str(out), "--eval_ppl", "--eval_dataset",
                                 corpus, "--eval_seqlen", "32", "--eval_max_windows", "6",
                                 "--device", "cpu", "--output", str(result_file)]) == 0
    result = json.loads(result_file.read_text())
    assert result["config"] == "gptq-w3g32-act"
    assert result["ppl"] == pytest.approx(report["summary"]["ppl_quantized"], rel=1e-6)
    assert result["ppl"] != pytest.approx(report["summary"]["ppl_fp"], rel=1e-6)


def test_eval_script_fp_model_and_arguments(tiny_model_dir, tmp_path, capsys):
    script = _script("eval")
    assert script.main(["--model", str(tiny_model_dir), "--eval_ppl", "--eval_dataset",
                        str(tiny_model_dir / "corpus.txt"), "--eval_seqlen", "32",
                        "--eval_max_windows", "4", "--dtype", "float32", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"] == "fp" and result["ppl"] > 1
    with pytest.raises(SystemExit):
        script.main(["--model", str(tiny_model_dir)])  # nothing to evaluate
    with pytest.raises(SystemExit):
        script.main(["--eval_pp"])  # abbreviations are errors


def test_pareto_sweep(tiny_model_dir, tiny_lattice_dir, tmp_path):
    csv_file = tmp_path / "quality.csv"
    argv = ["--model", str(tiny_model_dir), *_data_flags(tiny_model_dir), "--epochs", "1",
            "--lattice_dir", str(tiny_lattice_dir), "--configs", "8to4", "--baselines", "rtn:4",
            "gptq:2", "--group_size", "32", "--save_dir", str(tmp_path / "ck"),
            "--csv", str(csv_file), "--budget_gb", "0.0002"]
    assert _script("pareto").main(argv) == 0
    with open(csv_file, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == pareto.COLUMNS
    assert [(r["method"], r["config"]) for r in rows] == [
        ("fp", "float32"), ("liftquant", "8to4"), ("rtn", "rtn-w4g32"), ("gptq", "gptq-w2g32")]
    size = {r["method"]: float(r["size_gb"]) for r in rows}
    assert size["fp"] > size["rtn"] > size["gptq"] > 0
    assert float(rows[1]["bits_per_weight"]) > 2.0 and rows[1]["calib_tokens"] == "128"
    assert rows[2]["calib_tokens"] == "0" and all(r["gpu"] == "cpu" for r in rows)
    assert all(float(r["ppl_wiki_offline"]) > 1 for r in rows)
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())


def test_parse_jobs():
    assert pareto.parse_jobs("16to8, 24to10", ["rtn:2,3", "gptq:4"]) == [
        ("liftquant", "16to8", None), ("liftquant", "24to10", None), ("rtn", "rtn", 2),
        ("rtn", "rtn", 3), ("gptq", "gptq", 4)]
    with pytest.raises(ValueError, match="rtn:B"):
        pareto.parse_jobs(None, ["awq:4"])


ROW = {"model": "m", "method": "gptq", "config": "gptq-w3g128", "bits_per_weight": 3.16,
       "size_gb": 0.05, "ppl_wiki_offline": 30.5, "task_avg": 0.41, "tasks": "lq_boolq",
       "calib_tokens": 65536, "gpu": "cpu", "commit": "abc"}


def test_csv_writer_appends_and_checks_header(tmp_path):
    f = tmp_path / "q.csv"
    pareto.append_rows(f, [ROW])
    pareto.append_rows(f, [{**ROW, "config": "gptq-w2g128", "task_avg": ""}])
    with open(f, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and rows[1]["task_avg"] == "" and rows[0]["ppl_wiki_offline"] == "30.5"
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="columns"):
        pareto.append_rows(bad, [ROW])


def test_plot_headless(tmp_path):
    f = tmp_path / "q.csv"
    rows = [{**ROW, "method": "fp", "config": "bfloat16", "size_gb": 0.27, "ppl_wiki_offline": 20}]
    for method, pts in {"gptq": [(0.05, 40), (0.07, 25)], "rtn": [(0.05, 900), (0.07, 60)],
                        "liftquant": [(0.045, 28), (0.06, 23)]}.items():
        rows += [{**ROW, "method": method, "config": f"{method}{i}", "size_gb": s,
                  "ppl_wiki_offline": p} for i, (s, p) in enumerate(pts)]
    pareto.append_rows(f, rows)
    pytest.importorskip("matplotlib")
    png = pareto.plot(f, tmp_path / "q.png", budget_gb=0.06)
    assert png is not None and png.stat().st_size > 1000
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plot_skips_without_matplotlib(tmp_path, monkeypatch):
    f = tmp_path / "q.csv"
    pareto.append_rows(f, [ROW])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert pareto.plot(f, tmp_path / "q.png") is None
    assert not (tmp_path / "q.png").exists()


def test_merge_keeps_last_row_per_config_and_sorts(tmp_path):
    a, b, out = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "q.csv"
    pareto.append_rows(a, [{**ROW, "method": "rtn", "config": "rtn-w3g128", "size_gb": 0.05},
                           {**ROW, "ppl_wiki_offline": 99.0}])
    pareto.append_rows(b, [ROW, {**ROW, "method": "fp", "config": "bfloat16", "size_gb": 0.27},
                           {**ROW, "method": "liftquant", "config": "20to8", "size_gb": 0.04}])
    assert pareto.main(["merge", str(a), str(b), "--out", str(out)]) == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["method"], r["config"]) for r in rows] == [
        ("fp", "bfloat16"), ("liftquant", "20to8"), ("gptq", "gptq-w3g128"), ("rtn", "rtn-w3g128")]
    assert rows[2]["ppl_wiki_offline"] == "30.5"  # b's row replaced a's
    (tmp_path / "bad.csv").write_text("model,ppl\nm,3\n")
    with pytest.raises(ValueError, match="columns"):
        pareto.merge([tmp_path / "bad.csv"], out)


def test_profile_decode_kernel_categories(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # its bench_decode / bench_kernels imports
    prof = _script("profile_decode")
    assert prof.category("_transform_kernel") == "T*"
    assert prof.category("_splitk_kernel") == "int1 GEMV"
    assert prof.category("_gemv_kernel") == "int1 GEMV"
    assert prof.category("_fused_small_kernel") == "T* + int1 GEMV (one launch)"
    # cuBLAS's own GEMV kernels are not int1 GEMVs
    assert prof.category("void gemv2T_kernel_val<int, int, __nv_bfloat16, 128>") == "cuBLAS"
    assert prof.category("nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT") == "cuBLAS"
    assert prof.category("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == \
        "compiled (norm/attn/act)"
    with pytest.raises(ValueError, match="unknown shape"):
        prof.shape_config("gpt2")
