"""Evaluate an FP model, a LiftQuant checkpoint or an RTN/GPTQ baseline checkpoint.

    python scripts/eval.py --model demo --eval_ppl --tasks pack --output out/fp_eval.json
    python scripts/eval.py --quant_model_path out/demo --eval_ppl --tasks boolq,piqa

Perplexity follows liftquant.evaluation.eval (non-overlapping windows, GPTQ convention); --tasks runs
lm-eval (the offline pack by name, see liftquant.evaluation.tasks). The result is printed as JSON and
written to --output when given.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from liftquant.cli.config import (
    CalibArgs,
    EvalArgs,
    KernelArgs,
    ModelArgs,
    RunArgs,
    RunConfig,
    _f,
    build_parser,
)


@dataclass
class EvalScriptArgs(EvalArgs, KernelArgs):
    """The shared evaluation and kernel groups of liftquant.cli.config, plus what to evaluate."""

    quant_model_path: str | None = _f(None, "LiftQuant or baseline checkpoint folder (then "
                                      "--model is not used)")
    eval_batch_size: int = _f(8, "lm-eval requests per forward pass",
                              aliases=("--per_device_eval_batch_size", "--batch_size"))
    output: str | None = _f(None, "write the JSON result here")


def _given(ns, cls) -> dict:
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
            if getattr(ns, f.name, None) is not None}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.split("\n")[0],
                          groups={"model": ModelArgs, "eval": EvalScriptArgs})
    ns = parser.parse_args(argv)
    ev = EvalScriptArgs(**_given(ns, EvalScriptArgs))
    if not ev.eval_ppl and not ev.tasks:
        parser.error("nothing to evaluate: give --eval_ppl and/or --tasks")
    shared = {f.name: getattr(ev, f.name) for f in dataclasses.fields(EvalArgs)}
    cfg = RunConfig(model=ModelArgs(**_given(ns, ModelArgs)), calib=CalibArgs(),
                    run=RunArgs(**shared, backend=ev.backend))
    from liftquant.apps import api
    from liftquant.quantize.methods import load_checkpoint
    from liftquant.util.log import setup_logging

    setup_logging()
    device = api.resolve_device(cfg.model.device)
    if ev.quant_model_path:
        dtype = api._DTYPES[ns.dtype] if ns.dtype else None  # default: as stored
        model, tok = load_checkpoint(ev.quant_model_path, dtype=dtype, backend=ev.backend)
        if device.type == "cpu":  # decoded dense weights when they fit (kernels.dense; logged)
            from liftquant.engine import prepare_model

            prepare_model(model, device=device)
        qc = getattr(model.config, "quantization_config", None) or getattr(
            model, "liftquant_quantization_config", {})
        result = {"model": ev.quant_model_path, "quant_method": qc.get("quant_method"),
                  "config": qc.get("lattice") or qc.get("name")}
        report = Path(ev.quant_model_path) / "report.json"
        if report.is_file():
            result["bits"] = {k: v for k, v in json.loads(report.read_text())["bits"].items()
                              if k != "per_layer"}
    else:
        model, tok = api.load_model_for_run(cfg)
        result = {"model": cfg.model.model, "quant_method": None, "config": "fp"}
    if tok is None:
        parser.error("the model has no tokenizer files; evaluation needs one")
    result["device"] = str(device)
    from liftquant.util.provenance import provenance

    result["provenance"] = provenance(device=device)  # commit, dirty, source hash, GPU, argv
    if ev.eval_ppl:
        result.update(eval_dataset=ev.eval_dataset, eval_seqlen=ev.eval_seqlen,
                      ppl=api.eval_perplexity(model, tok, cfg, device))
    if ev.tasks:
        result["tasks"] = api.eval_tasks(model, tok, cfg, device)
    text = json.dumps(result, indent=1)
    if ev.output:
        Path(ev.output).parent.mkdir(parents=True, exist_ok=True)
        Path(ev.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
