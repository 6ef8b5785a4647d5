"""CPU chat speed: prefill and decode tokens/s of both engines, with and without the dense
weight cache (``liftquant.kernels.dense``), through the engines ``liftquant/chat.py`` runs.

* ``--checkpoint DIR``: a LiftQuant checkpoint (``main.py --save_dir``);
* otherwise the demo's shape with random codes: SmolLM2-135M (``--fp_model``, default the
  converted demo model in the liftquant cache) with every decoder linear replaced by a packed
  layer of ``--lattice`` (default the CPU demo's 9to3) holding random codes. Decode speed
  depends on shapes only, so this times what the demo checkpoint would, without the ~9 minutes
  of CPU quantization.

Each run: ``--prompt`` tokens prefilled in one pass, then ``--tokens`` greedy decode steps.
Prints one markdown row per (engine, dense cache) with the commit.

    python scripts/bench_cpu_chat.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from liftquant.engine import build_engine
from liftquant.kernels.dense import build_dense_cache, dense_cache_bytes, drop_dense_cache
from liftquant.util.provenance import record_fields

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@torch.no_grad()
def random_packed_model(fp_model: str, lattice: str, dtype: torch.dtype):
    """The FP model with every decoder linear replaced by a random-code packed layer."""
    from transformers import AutoModelForCausalLM

    from liftquant.core.linear import PackedLiftLinear

    model = AutoModelForCausalLM.from_pretrained(fp_model, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    for block in model.model.layers:
        for name in LINEARS:
            parent_name, attr = name.rsplit(".", 1)
            parent = block.get_submodule(parent_name)
            lin = getattr(parent, attr)
            layer = PackedLiftLinear(lin.in_features, lin.out_features, spec=lattice,
                                     bias=lin.bias is not None)
            layer.packed_signs.copy_(torch.randint(0, 256, layer.packed_signs.shape, generator=g,
                                                   dtype=torch.uint8))
            n1, n2 = layer.block_shape
            layer.scale.fill_(float(lin.weight.float().std()) / layer.lifted_width**0.5 * 2)
            layer.L.copy_(torch.linalg.qr(torch.randn(n1, n1, generator=g))[0])
            layer.R.copy_(torch.randn(*layer.R.shape, generator=g) / n2**0.5)
            setattr(parent, attr, layer)
    return model


def time_engine(model, kind: str, *, prompt: int, tokens: int) -> tuple[float, float]:
    engine = build_engine(model, kind, max_len=prompt + tokens + 8)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt),
                        generator=torch.Generator().manual_seed(1))
    engine.warm_up(prompt_len=8, steps=2)
    with torch.inference_mode():
        t0 = time.perf_counter()
        token = engine.prefill(ids).argmax(-1)
        t1 = time.perf_counter()
        for _ in range(tokens):
            token = engine.next(token).argmax(-1)
        t2 = time.perf_counter()
    return prompt / (t1 - t0), tokens / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--fp_model", default=None, help="default: the converted demo model")
    ap.add_argument("--lattice", default="9to3")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--engines", default="hf,step")
    ap.add_argument("--dense", default="0,1", help="dense cache settings to time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.checkpoint:
        from liftquant.io.checkpoint import load_quantized

        model = load_quantized(args.checkpoint, device="cpu", dtype=dtype)[0]
        source = args.checkpoint
    else:
        from liftquant.demo.assets import hf_model_dir

        fp = args.fp_model or str(hf_model_dir())
        model = random_packed_model(fp, args.lattice, dtype)
        source = f"{fp} with random {args.lattice} codes"
    prov = record_fields(device="cpu")
    print(f"{source}; {args.threads} threads; {prov['commit']}"
          + (" (dirty)" if prov.get("dirty") else ""))
    print(f"dense cache: {dense_cache_bytes(model, dtype) / 2**20:.0f} MiB in {dtype}")
    print("| engine | dense cache | dtype | prefill tok/s | decode tok/s | threads | commit |")
    print("|---|---|---|---|---|---|---|")
    for dense in args.dense.split(","):
        if dense == "1":
            build_dense_cache(model, dtype)
        else:
            drop_dense_cache(model)
        for kind in args.engines.split(","):
            pre, dec = time_engine(model, kind, prompt=args.prompt, tokens=args.tokens)
            print(f"| {kind} | {'on' if dense == '1' else 'off'} | {args.dtype} | {pre:.1f} | "
                  f"{dec:.1f} | {args.threads} | {prov['commit']} |", flush=True)


if __name__ == "__main__":
    main()
