"""Layer 5, the applications the entry scripts call: one call per CLI step (:mod:`.api`: load,
quantize, save, evaluate; it registers the LiftQuant method) and end-to-end fine-tuning
(:mod:`.finetune`). It may import every layer below. The chat (:mod:`liftquant.chat`) and the
decode engine (:mod:`liftquant.engine`) sit in this layer too; nothing below imports it at top
level."""
