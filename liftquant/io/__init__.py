"""Layer 3, the self-describing checkpoint format: per-tensor checksums (:mod:`.integrity`),
``save_quantized`` / ``load_quantized`` with the one swap (``swap_packed``) and the one strict
load (``strict_load``) (:mod:`.checkpoint`), exact file sizes before anything is written
(:mod:`.size`), and the transformers ``from_pretrained`` integration (:mod:`.hf`, registered by
``import liftquant`` once transformers is imported), and the RTN/GPTQ baseline checkpoints
(:mod:`.baseline_format`). It may import :mod:`liftquant.util`,
:mod:`liftquant.core`, :mod:`liftquant.kernels` and :mod:`liftquant.models`; never the
quantization pipeline, evaluation or the apps."""
