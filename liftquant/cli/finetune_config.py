"""The flags and the report table of ``e2efinetune.py`` (SPEC §5), without torch, so the entry
script refuses a bad flag -- a ``--lattice`` that does not parse, say -- before it imports
anything heavy. The training itself is :mod:`liftquant.apps.finetune`."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from liftquant.cli.config import (
    DeviceArgs,
    EvalArgs,
    KernelArgs,
    _f,
    add_dataclass_args,
    check_device,
)
from liftquant.core.latticespec import LatticeSpec

REPORT_NAME = "e2e_report.json"
RUN_NAME = "e2e_run.json"


@dataclass
class E2EArgs(DeviceArgs, KernelArgs, EvalArgs):
    """The e2e flags; device, kernel and evaluation settings are the shared groups of
    :mod:`liftquant.cli.config` (the seed's ``--do_ppl_eval``, ``--eval_dataset_size``,
    ``--per_device_eval_batch_size`` ... are their aliases)."""

    quant_model_path: str | None = _f(None, "packed LiftQuant checkpoint folder (required)")
    fp_model_path: str | None = _f(None, "FP model: its perplexity is reported as a reference, "
                                   "and its tokenizer used if the checkpoint has none")
    output_dir: str = _f("out/e2e", "where the fine-tuned packed checkpoint is saved")
    model_family: str | None = _f(None, "compat: the architecture is read from the checkpoint")
    wbits: int | None = _f(None, "compat: bits come from the checkpoint's lattice")
    expc: str | None = _f(None, "expected lattice '<D>to<d>'; must match the checkpoint",
                          flag="--lattice")
    do_train: bool = _f(False, "train (without it: only the 'before' evaluation)")
    learning_rate: float = _f(2e-5, "lr of the per-row scales")
    factor_t: float = _f(10.0, "lr factor of the fused transform factors L, R",
                         flag="--lr_factor_transform")
    factor_a: float = _f(100.0, "lr factor of s1 and s2", flag="--lr_factor_channel_scales")
    lr_scheduler_type: str = _f("cosine", "lr schedule", choices=("cosine", "constant"))
    max_grad_norm: float = _f(0.3, "gradient-norm clip (0: off)")
    dataset: str = _f("wiki-offline", "training text: wiki-offline | redpajama | c4 | "
                      "wikitext2 | path to .txt/.jsonl")
    dataset_format: str = _f("pt", "only 'pt' (plain-text causal LM)", choices=("pt",))
    pt_context_len: int = _f(2048, "tokens per training window")
    max_train_samples: int = _f(4096, "training windows (paper: 4096 x 4096 tokens)")
    num_train_epochs: float = _f(1.0, "epochs over the training windows")
    per_device_train_batch_size: int = _f(1, "windows per forward pass")
    gradient_accumulation_steps: int = _f(1, "forward passes per optimizer step")
    gradient_checkpointing: bool = _f(True, "recompute activations (when the model supports it)")
    bf16: bool = _f(False, "bf16 autocast on CUDA; on CPU training runs in float32")
    data_seed: int = _f(0, "seed of window sampling and shuffling")
    logging_steps: int = _f(10, "log the loss every this many optimizer steps")
    eval_strategy: str = _f("no", "'steps': perplexity every --eval_steps (needs "
                            "--eval_ppl); 'no'/'epoch' evaluate before and after only",
                            aliases=("--evaluation_strategy",), choices=("no", "steps", "epoch"))
    eval_steps: int = _f(0, "optimizer steps between perplexity evaluations (--eval_strategy "
                         "steps)")
    save_strategy: str = _f("no", "compat: only the final checkpoint is saved")
    training_strategy: str = _f("epochs", "compat: training runs --num_train_epochs epochs")
    preprocessing_num_workers: int | None = _f(None, "compat: tokenization is cached, "
                                               "single process")
    eval_batch_size: int = _f(1, "batch size of perplexity and task evaluation",
                              aliases=("--per_device_eval_batch_size",))

    def __post_init__(self) -> None:
        if not self.quant_model_path:
            raise ValueError("--quant_model_path is required")
        check_device(self.device)
        if self.expc is not None:
            try:
                LatticeSpec.parse(self.expc)  # before anything is loaded
            except ValueError as exc:
                raise ValueError(f"--lattice/--expc: {exc}") from None
        if min(self.pt_context_len, self.max_train_samples, self.per_device_train_batch_size,
               self.gradient_accumulation_steps, self.eval_batch_size) < 1:
            raise ValueError("context length, sample count and batch sizes must be >= 1")
        if self.pt_context_len < 2 or self.num_train_epochs <= 0 or self.learning_rate <= 0:
            raise ValueError("need --pt_context_len >= 2, --num_train_epochs > 0, --learning_rate > 0")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> E2EArgs:
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
                      if getattr(ns, f.name, None) is not None})


def build_e2e_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    add_dataclass_args(p, E2EArgs, group="e2e")
    return p


def format_report(report: dict[str, Any]) -> str:
    """Before/after table: perplexity, task average and per-task accuracy."""
    b, a = report.get("before", {}), report.get("after", {})
    rows = [("metric", "before", "after")]
    if "fp" in report:
        rows.append(("FP perplexity", f"{report['fp']['ppl']:.3f}", ""))
    if "ppl" in b:
        rows.append(("perplexity", f"{b['ppl']:.3f}", f"{a['ppl']:.3f}" if "ppl" in a else "-"))
    for name in (b.get("tasks") or {}).get("tasks", {}):
        acc = [r.get("tasks", {}).get("tasks", {}).get(name, {}).get("acc") for r in (b, a)]
        rows.append((f"{name} acc", *(f"{x:.4f}" if x is not None else "-" for x in acc)))
    if "tasks" in b:
        rows.append(("task average", f"{b['tasks']['task_avg']:.4f}",
                     f"{a['tasks']['task_avg']:.4f}" if "tasks" in a else "-"))
    if "tasks_skipped" in b:
        rows.append(("tasks", "skipped", b["tasks_skipped"][:60]))
    t = report.get("train")
    if t:
        h = t["history"]
        rows.append(("train loss (first/last step)", f"{h[0]['loss']:.4f}", f"{h[-1]['loss']:.4f}"))
        rows.append(("train steps / tokens / s", f"{t['steps']} / {t['tokens']}",
                     f"{t['seconds']} s ({t['compute']})"))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{w}}  {r[1]:>12}  {r[2]:>12}" for r in rows)
