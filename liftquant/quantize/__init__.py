"""Layer 4, the quantization pipeline: the method registry (:mod:`.methods`), activation caches
(:mod:`.cache`), block-input capture (:mod:`.capture`), the one batch iterator
(:mod:`.stream`), block training (:mod:`.blocktrain`), the memory plan (:mod:`.plan`), per-block
resume files (:mod:`.blockstore`), the block loop ``quantize_model`` (:mod:`.calibrate`), rate
selection (:mod:`.rate`), torchrun (:mod:`.distributed`) and the RTN/GPTQ baselines
(:mod:`.baselines`). It may import :mod:`liftquant.io` and everything below it
(:mod:`liftquant.cli`, :mod:`liftquant.core`, :mod:`liftquant.kernels`,
:mod:`liftquant.models`, :mod:`liftquant.util`) at top level; the method registry reaches the
modules that register methods (:mod:`liftquant.apps.api`) only inside functions."""
