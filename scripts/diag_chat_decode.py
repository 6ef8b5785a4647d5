"""Why is chat decode slower than bench_decode? Time the chat's HF decode step three ways on
one checkpoint (GPU): eager, torch.compile(mode="reduce-overhead") as liftquant.chat uses it,
and the eager step captured by hand as one CUDA graph (static ids / position / cache).

    TORCH_LOGS=perf_hints python scripts/diag_chat_decode.py --quant_model_path CKPT
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liftquant.apps.chat import ChatSession, load_chat_model, parse_args


def rate(fn, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant_model_path", required=True)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--max_cache_len", type=int, default=4096)
    a = ap.parse_args()
    args, _ = parse_args(["--quant_model_path", a.quant_model_path, "--backend", "triton",
                          "--max_cache_len", str(a.max_cache_len), "--engine", "hf"])
    model, tok, device = load_chat_model(args)
    session = ChatSession(model, tok, args, device)
    session.warm_up()
    s = session.loop  # the HF engine: _decode_step (eager) and decode (compiled)
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.tensor([40], device=device)
    print(f"eager:           {rate(lambda: s._decode_step(ids, pos), a.steps):8.1f} steps/s")
    print(f"reduce-overhead: {rate(lambda: s.decode(ids, pos), a.steps):8.1f} steps/s")
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                s._decode_step(ids, pos)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = s._decode_step(ids, pos)
        print(f"manual graph:    {rate(g.replay, a.steps):8.1f} steps/s")
        ref = s._decode_step(ids, pos)
        g.replay()
        print("manual graph matches eager:", bool(torch.allclose(out.float(), ref.float(),
                                                                  atol=1e-2, rtol=1e-2)))
    except Exception as err:  # noqa: BLE001 - a diagnostic: report and go on
        print(f"manual graph capture failed: {type(err).__name__}: {str(err)[:400]}")


if __name__ == "__main__":
    main()
