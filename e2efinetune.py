"""End-to-end fine-tuning of a packed LiftQuant checkpoint: codes frozen, continuous parameters
(scales, fused T* factors, s1, s2) trained on the causal-LM loss (SPEC §5).

    python e2efinetune.py --quant_model_path out/m --output_dir out/m-e2e --do_train \\
        --do_ppl_eval --pt_context_len 2048 --max_train_samples 4096 --bf16
    python e2efinetune.py --fp_model_path M --quant_model_path Q --wbits 2 --expc 20to8 \\
        --factor_a 100 --factor_t 10 --learning_rate 2e-5 --dataset redpajama ... (seed README)

Every flag is documented in ``--help``; flags marked "compat:" are the authors' spellings,
accepted so their README command runs unchanged. ``--evaluation_strategy`` (renamed in current
transformers) is the same flag as ``--eval_strategy``.
"""

from __future__ import annotations

import sys

from liftquant.cli.finetune_config import REPORT_NAME, E2EArgs, build_e2e_parser, format_report
from liftquant.util import errors
from liftquant.util.log import setup_logging


def _parse(argv: list[str] | None) -> tuple[E2EArgs, bool]:
    parser = errors.one_line_usage_errors(build_e2e_parser(__doc__.split("\n")[0]))
    parser.add_argument("--debug", action="store_true",
                        help="on an error show the full traceback instead of one line")
    ns = parser.parse_args(argv)
    try:
        return E2EArgs.from_args(ns), ns.debug
    except ValueError as exc:
        parser.error(str(exc))


def parse(argv: list[str] | None = None) -> E2EArgs:
    return _parse(argv)[0]


def main(argv: list[str] | None = None) -> int:
    """Bad input: one line ``error: ...`` on stderr, exit 2 (``--debug``: the traceback);
    a run refused before it saves a checkpoint leaves no ``--output_dir`` behind."""
    cfg, debug = _parse(argv)
    from liftquant.apps.finetune import run_e2e

    guard = errors.OutputGuard(cfg.output_dir, flag="--output_dir")
    try:
        guard.check_writable()
        setup_logging(log_file=f"{cfg.output_dir}/e2e.log")
        report = run_e2e(cfg)
    except BaseException as exc:  # e.g. --expc does not match the checkpoint
        guard.cleanup()
        if debug or not isinstance(exc, errors.expected_errors()):
            raise
        return errors.report(exc, errors.EXIT_USAGE)
    print(format_report(report))
    print(f"report: {cfg.output_dir}/{REPORT_NAME}"
          + ("" if cfg.do_train else " (no --do_train: nothing trained or saved)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
