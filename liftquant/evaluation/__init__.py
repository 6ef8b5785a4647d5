"""Layer 4, evaluation and its data: token tensors for calibration and evaluation
(:mod:`.data`), perplexity (:mod:`.eval`), the lazy lm-eval adapter (:mod:`.lmeval`), the
offline task pack (:mod:`.tasks`, ``python -m liftquant.evaluation.tasks``) and Pareto rows
(:mod:`.pareto`, ``python -m liftquant.evaluation.pareto``). It may import
:mod:`liftquant.demo` and :mod:`liftquant.util` at top level; it does not depend on the
quantization pipeline, so a checkpoint is evaluated without it."""
