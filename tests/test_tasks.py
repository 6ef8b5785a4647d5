"""Offline task pack: normalisation of the real source schemas, YAML generation, lm-eval loading.

The fake rows below copy the schemas (and the glitches) found in the pinned wheel files.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

from liftquant.evaluation import tasks as T

torch.set_num_threads(1)

RAW = {
    "boolq": [
        {"question": "is the sky blue", "title": "Sky", "answer": "True",
         "passage": "The sky is blue on a clear day."},
        {"question": "do fish fly", "title": "Fish", "answer": "False",
         "passage": "Most fish swim in water."},
    ],
    "piqa": [
        {"question": "To open a jar", "options": "A. twist the lid \nB. eat the lid",
         "answer": "A. twist the lid "},
        {"question": "dresser", "options": "A. replace drawer\nB. finish, woodgrain",
         "answer": "B. finish, woodgrain"},
    ],
    "openbookqa": [
        {"question": "The sun is a ", "options": "A. star\nB. planet\nC. moon\nD. comet",
         "answer": "A. star"},
        {"question": "Fog is likely near: ", "options": "A. a desert\nB. a marsh\nC. a dune\n"
         "D. the plains", "answer": "B. a marsh"},
    ],
    "commonsense_qa": [
        {"question": "Where do you keep milk?", "answer": "C. fridge",
         "options": "\nA. shelf\nB. car\nC. fridge\nD. bag\nE. roof"},
        {"question": "What is important to learn\nA. newness\nB. innocence",
         "options": "\nC. light\nD. open mind\nE. smartness?", "answer": "D. open mind"},
        {"question": "He had to settle for what?", "answer": "D. can",
         "options": ".\nA. shelf\nB. game\nC. keg\nD. can\nE. fridge"},
    ],
    "siqa": [
        {"passage": "Tracy stayed out late.", "question": "What will Tracy do next?",
         "options": "A. sleep\nB. run\nC. sing", "answer": "A. sleep"},
        {"passage": "Sydney gave money.", "question": "How would you describe Sydney?",
         "options": "A. mean\nB. generous\nC. sad", "answer": "B. generous"},
    ],
    "mmlu": [
        {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b",
         "answer_c": "answer_c", "answer_d": "answer_d", "correct_answer": "answer",
         "topic": "college mathematics"},
        {"question": "2 + 2 = ?", "answer_a": "3", "answer_b": "4", "answer_c": "5",
         "answer_d": "22", "correct_answer": "B", "topic": "elementary mathematics"},
        {"question": "Largest planet?", "answer_a": "Mars", "answer_b": "Venus",
         "answer_c": "Earth", "answer_d": "Jupiter", "correct_answer": "D", "topic": "astronomy"},
    ],
}


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    raw = {}
    for name, rows in RAW.items():
        raw[name] = root / "raw" / f"{name}.jsonl"
        raw[name].parent.mkdir(exist_ok=True)
        raw[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    T.build_pack(raw, root / "tasks")
    return root / "tasks"


def test_normalize_real_schemas():
    boolq, _ = T.normalize("boolq", RAW["boolq"])
    assert [r["label"] for r in boolq] == [1, 0] and boolq[0]["choices"] == ["no", "yes"]
    assert boolq[0]["context"].startswith("The sky")
    piqa, _ = T.normalize("piqa", RAW["piqa"])
    assert piqa[0]["choices"] == ["twist the lid", "eat the lid"] and piqa[1]["label"] == 1
    obqa, _ = T.normalize("openbookqa", RAW["openbookqa"])
    assert obqa[0]["question"] == "The sun is a" and len(obqa[1]["choices"]) == 4
    csqa, stats = T.normalize("commonsense_qa", RAW["commonsense_qa"])
    assert stats == {"dropped": 0, "repaired": 3}
    assert csqa[1]["question"] == "What is important to learn"
    assert csqa[1]["choices"] == ["newness", "innocence", "light", "open mind", "smartness"]
    assert csqa[1]["label"] == 3 and csqa[2]["choices"][0] == "shelf" and csqa[2]["label"] == 3
    siqa, _ = T.normalize("siqa", RAW["siqa"])
    assert siqa[1]["context"] == "Sydney gave money." and siqa[1]["label"] == 1
    mmlu, stats = T.normalize("mmlu", RAW["mmlu"])
    assert stats["dropped"] == 1 and [r["label"] for r in mmlu] == [1, 3]
    assert mmlu[1]["subject"] == "astronomy" and mmlu[1]["choices"][3] == "Jupiter"
    with pytest.raises(T.TaskDataError):
        T.normalize("piqa", [{"question": "q", "options": "B. x\nC. y", "answer": "B. x"}])


def test_yaml_files(pack_dir):
    manifest = json.loads((pack_dir / "pack.json").read_text())
    assert set(manifest) == set(T.SOURCES) and manifest["mmlu"]["rows"] == 2
    for source in T.SOURCES.values():
        cfg = yaml.safe_load((pack_dir / f"{source.task}.yaml").read_text())
        data = cfg["dataset_kwargs"]["data_files"]["validation"]
        assert cfg["task"] == source.task and cfg["dataset_path"] == "json"
        with open(data) as f:
            first = json.loads(f.readline())  # id = row index in the source file
        assert data.startswith("/") and set(first) == {"id", "question", "context", "subject",
                                                       "choices", "label"}
        assert cfg["validation_split"] == "validation" and cfg["doc_to_target"] == "label"
    assert T.fetch(["boolq", "social_iqa"], out_dir=pack_dir) == pack_dir  # built: no download


def test_name_mapping():
    assert T.resolve_tasks("boolq, social_iqa,lq_mmlu,siqa,arc_easy") == [
        "lq_boolq", "lq_siqa", "lq_mmlu", "arc_easy"]
    assert T.resolve_tasks("pack") == [s.task for s in T.SOURCES.values()]
    assert T.pack_names(["lq_boolq", "arc_easy"]) == ["boolq"]


def test_missing_lm_eval_names_the_install(monkeypatch):
    from liftquant.evaluation import lmeval

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        lmeval.evaluate_tasks(torch.nn.Linear(1, 1), None, "boolq")


def test_lm_eval_loads_pack_offline(pack_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(pack_dir), include_defaults=False)
    loaded = manager.load([s.task for s in T.SOURCES.values()])["tasks"]
    expected = {
        "lq_boolq": ("The sky is blue on a clear day.\nQuestion: is the sky blue?\nAnswer:", 1),
        "lq_piqa": ("Question: To open a jar\nAnswer:", 0),
        "lq_commonsense_qa": (("Question: Where do you keep milk?\nA. shelf\nB. car\nC. fridge\n"
                               "D. bag\nE. roof\nAnswer:"), 2),
        "lq_siqa": ("Q: Tracy stayed out late. What will Tracy do next?\nA:", 0),
        "lq_mmlu": (("The following are multiple choice questions (with answers) about "
                     "elementary mathematics.\n\n2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"), 1),
    }
    for name, (prompt, target) in expected.items():
        task = next(t for key, t in loaded.items() if name in str(key))
        doc = next(iter(task.validation_docs()))
        assert task.fewshot_context(doc, 0) == prompt, name
        assert task.doc_to_target(doc) == target


def test_evaluate_tasks_on_tiny_model(pack_dir):
    pytest.importorskip("lm_eval")
    from conftest import make_tokenizer

    from liftquant.evaluation.lmeval import evaluate_tasks, format_table
    from liftquant.models import tiny_llama

    res = evaluate_tasks(tiny_llama(seed=0), make_tokenizer(), "boolq,piqa,mmlu", batch_size=4,
                         limit=2, include_path=str(pack_dir))
    assert list(res["tasks"]) == ["lq_boolq", "lq_piqa", "lq_mmlu"]
    assert all(0.0 <= r["acc"] <= 1.0 and r["n"] == 2 for r in res["tasks"].values())
    assert "acc_norm" in res["tasks"]["lq_piqa"] and "acc_norm" not in res["tasks"]["lq_boolq"]
    assert 0.0 <= res["task_avg"] <= 1.0 and "lq_piqa" in format_table(res)
