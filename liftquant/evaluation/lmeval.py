"""lm-eval adapter: zero-shot accuracy of an in-memory (quantized or FP) model.

``lm_eval`` is an optional dependency (``pip install -r requirements-eval.txt``) imported only
when :func:`evaluate_tasks` runs. Task names go through :func:`liftquant.evaluation.tasks.resolve_tasks`:
the offline pack (``boolq``, ``piqa``, ``openbookqa``, ``commonsense_qa``, ``siqa`` /
``social_iqa``, ``mmlu``, or ``pack`` for all) is fetched into the cache on first use and loaded
with ``TaskManager(include_path=...)``; lm-eval's built-in tasks are indexed only when some
other name is asked for (those need the Hugging Face hub for their data).

The model is wrapped as ``HFLM(pretrained=model, tokenizer=tokenizer)`` (no reload, packed
layers stay packed) and scored with ``lm_eval.simple_evaluate``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from liftquant.util.log import get_logger, timer

logger = get_logger("lmeval")

INSTALL_HINT = "pip install lm-eval (or pip install -r requirements-eval.txt)"
METRICS = ("acc", "acc_norm")
FILTER = "none"  # lm-eval's key suffix for unfiltered multiple-choice metrics ("acc,none")


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(f"zero-shot tasks need the lm-eval package: {INSTALL_HINT} "
                          f"({err})") from err
    return lm_eval, HFLM, TaskManager


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    batch_size: int = 8,
    limit: int | None = None,
    device: torch.device | str | None = None,
    num_fewshot: int | None = None,
    include_path: str | None = None,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``model``; returns :func:`summarize` of the results.

    ``limit`` caps the examples per task (quick checks; reported in the result). ``device``
    moves the model there first (default: where it is). The model is left in eval mode.
    """
    from liftquant.evaluation import tasks as pack

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(var, "1")  # pack data are local files; never reach for the hub
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    names = pack.resolve_tasks(tasks)
    if not names:
        raise ValueError("no tasks given")
    ours = pack.pack_names(names)
    if ours:
        include_path = str(pack.fetch(ours, out_dir=include_path))
    manager = TaskManager(include_path=include_path,
                          include_defaults=len(ours) < len(names))
    if device is not None:
        model.to(device)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with timer() as t, torch.no_grad():
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False)
    res = summarize(out, names)
    res.update(limit=limit, seconds=round(t["seconds"], 1))
    return res


def summarize(out: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """``{"tasks": {name: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}, "task_avg"}``.

    ``task_avg`` is the unweighted mean of ``acc`` over the tasks (the paper's average).
    """
    per_task = {}
    for name in names:
        metrics = out["results"].get(name, {})
        row: dict[str, Any] = {}
        for m in METRICS:
            for key in (m, f"{m}_stderr"):
                value = metrics.get(f"{key},{FILTER}")
                if isinstance(value, int | float) and math.isfinite(value):
                    row[key] = float(value)
        n = out.get("n-samples", {}).get(name, {})
        row["n"] = n.get("effective", n.get("original")) if isinstance(n, dict) else None
        per_task[name] = row
    accs = [r["acc"] for r in per_task.values() if "acc" in r]
    return {"tasks": per_task, "task_avg": sum(accs) / len(accs) if accs else float("nan")}


def format_table(res: dict[str, Any]) -> str:
    """Plain-text table: task, n, acc ± stderr, acc_norm ± stderr, and the average."""
    def cell(row, m):
        if m not in row:
            return "-"
        err = row.get(f"{m}_stderr")
        return f"{row[m]:.4f}" + (f" ± {err:.4f}" if err is not None else "")

    lines = [f"{'task':<20} {'n':>6}  {'acc':<17} {'acc_norm':<17}"]
    for name, row in res["tasks"].items():
        lines.append(f"{name:<20} {row.get('n') or '-':>6}  {cell(row, 'acc'):<17} "
                     f"{cell(row, 'acc_norm'):<17}")
    lines.append(f"{'average (acc)':<20} {'':>6}  {res['task_avg']:.4f}")
    return "\n".join(lines)
