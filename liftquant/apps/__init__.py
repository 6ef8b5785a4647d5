"""Layer 5, the applications the entry scripts call: one call per CLI step (:mod:`.api`: load,
quantize, save, evaluate; it registers the LiftQuant method), end-to-end fine-tuning
(:mod:`.finetune`) and the chat loop behind ``chat/chat_bitblas_compile.py`` (:mod:`.chat`). It
may import every layer below; the decode engine (:mod:`liftquant.engine`) sits in this layer
too and is imported by the chat inside functions. Nothing below imports it at top level."""
