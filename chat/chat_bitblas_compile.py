"""Chat with a LiftQuant checkpoint: streaming, multi-turn, static KV cache, compiled decode.

    python chat/chat_bitblas_compile.py --quant_model_path out/demo
    python chat/chat_bitblas_compile.py --quant_model_path out/demo --prompt "Hi!" --prompt "And?"
    python chat/chat_bitblas_compile.py --quant_model_path out/m --backend bitblas --do_sample

The checkpoint is self-contained (packed weights, config and tokenizer), so ``--fp_model_path``
(the seed's flag) is optional; if given, only the tokenizer is read from it. ``--backend``
picks the packed-layer kernels (auto: Triton on CUDA, torch on CPU; bitblas falls back with a
warning when its kernels cannot be built). On CUDA the decode step is compiled with CUDA graphs
(``--no-compile`` turns it off). Prefill and decode tokens/s are printed after every answer.
All logic lives in :mod:`liftquant.chat`; ``--help`` lists every flag.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from liftquant.apps.chat import main

if __name__ == "__main__":
    sys.exit(main())
