"""Store a LiftQuant checkpoint's LM head in 8 bits (per-channel symmetric int8).

    python scripts/quantize_lm_head.py --checkpoint out/demo --save_dir out/demo-head8

Loads the checkpoint (strictly), replaces the head by ``kernels.int8_head.Int8Linear`` (a tied
head is untied: the embedding stays as stored), records ``quantization_config["lm_head"]`` and
saves a new checkpoint that every loader reads (``checkpoint.swap_packed``). Prints the bits
report's head and total before and after, and the relative change of the logits on random
tokens (``--eval_ppl`` also runs the perplexity of both; see ``scripts/eval.py`` for tasks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liftquant.io.checkpoint import bits_report, load_quantized, save_quantized
from liftquant.kernels.int8_head import quantize_lm_head


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--save_dir", required=True)
    ap.add_argument("--bits", type=int, default=8, choices=(8,))
    args = ap.parse_args(argv)
    model, tok = load_quantized(args.checkpoint)
    before = bits_report(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 32),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits.float()
    entry = quantize_lm_head(model, bits=args.bits)
    with torch.no_grad():
        out = model(ids).logits.float()
    qc = {**model.config.quantization_config, "lm_head": entry}
    qc.pop("tensor_checksums", None)
    save_quantized(model, tok, args.save_dir, qconfig=qc)
    after = bits_report(model)
    rel = float((out - ref).norm() / ref.norm())
    print(f"lm_head: {before['lm_head_bits'] / 8e6:.2f} MB -> {after['lm_head_bits'] / 8e6:.2f} MB"
          f" (embeddings {after['embeddings_bits'] / 8e6:.2f} MB); total "
          f"{before['total_bytes'] / 1e6:.2f} -> {after['total_bytes'] / 1e6:.2f} MB; logits "
          f"relative change {rel:.2e}; saved {args.save_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
