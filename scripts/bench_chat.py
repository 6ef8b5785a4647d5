"""Chat speed: prefill and decode tokens/s of both chat engines (``liftquant.engine``: the graphed
decode step and the HF engine), on the GPU or the CPU, for a LiftQuant checkpoint and, beside it,
its FP original through the same engines.

* ``--checkpoint DIR``: a LiftQuant checkpoint (``main.py --save_dir``); ``--fp_model`` (a
  folder, or ``demo`` for the converted demo model) is timed alongside in ``--dtype``;
* no checkpoint: the demo's shape with random codes: SmolLM2-135M (or ``--fp_model``; a folder
  with only a config.json gives random weights of its shape) with every decoder linear
  replaced by a packed layer of ``--lattice`` (default the CPU demo's 9to3) holding random
  codes (``--with_fp``: the FP model timed beside it). Decode speed depends on shapes only, so
  this times what the demo checkpoint would, without its quantization.

Each run: a ``--prompt`` token prompt prefilled in one pass (median of ``--repeats``), then
``--tokens`` greedy decode steps. On the CPU each run is timed with the dense weight cache off
and on (``--dense``). Rows merge into ``bench/chat/chat.csv`` (provenance recorded by the script);
a markdown table is printed last.

    python scripts/bench_chat.py --device cpu --threads 2
    python scripts/bench_chat.py --checkpoint out/demo --fp_model demo --prompt 42,512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from liftquant.engine import build_engine
from liftquant.kernels.dense import build_dense_cache, dense_cache_bytes, drop_dense_cache
from liftquant.util.provenance import record_fields

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
KEY = ("model", "engine", "dense_cache", "dtype", "device", "prompt", "tokens", "threads",
       "compile", "gpu", "commit", "source_sha256")


@torch.no_grad()
def random_packed_model(fp_model: str, lattice: str, dtype: torch.dtype):
    """The FP model with every decoder linear replaced by a random-code packed layer."""

    from liftquant.core.linear import PackedLiftLinear

    model = _fp_model(fp_model, dtype)
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


def _fp_model(path: str, dtype: torch.dtype):
    """The model in folder ``path``; a folder holding only a config.json gives random weights
    of that shape (speed depends on shapes only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if any(Path(path).glob("*.safetensors")):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_engine(model, kind: str, *, prompt: int, tokens: int, compile: bool = False,
                repeats: int = 1) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of engine ``kind``: the median of ``repeats`` prefills of a
    ``prompt``-token prompt, then ``tokens`` greedy steps after the last one."""
    device = next(model.parameters()).device
    engine = build_engine(model, kind, max_len=prompt + tokens + 8, compile=compile,
                          device=device)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt),
                        generator=torch.Generator().manual_seed(1)).to(device)
    engine.warm_up(prompt_len=min(prompt, 16), steps=2)
    with torch.inference_mode():
        pre = []
        for _ in range(max(repeats, 1)):
            engine.reset()
            _sync(device)
            t0 = time.perf_counter()
            token = engine.prefill(ids).argmax(-1)
            _sync(device)
            pre.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        for _ in range(tokens):
            token = engine.next(token).argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
    return prompt / statistics.median(pre), tokens / (t2 - t1)


def _load(args, dtype, device):
    """[(model name, model)] to time: the checkpoint (or random codes) and the FP original."""
    from liftquant.demo.assets import hf_model_dir

    def fp_path() -> str:
        return str(hf_model_dir()) if args.fp_model in (None, "demo") else args.fp_model

    out = []
    if args.checkpoint:
        from liftquant.io.checkpoint import load_quantized

        out.append((Path(args.checkpoint).name or args.checkpoint,
                    load_quantized(args.checkpoint, device=device, dtype=dtype)[0]))
    else:
        out.append((f"demo shape, random {args.lattice}",
                    random_packed_model(fp_path(), args.lattice, dtype).to(device)))
    if args.fp_model and (args.checkpoint or args.with_fp):
        fp = fp_path()
        model = _fp_model(fp, dtype).to(device)
        out.append((f"{Path(fp).name} ({args.dtype})", model))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--fp_model", default=None,
                    help="FP original (folder or 'demo'): timed beside --checkpoint; without a "
                         "checkpoint, the model whose shape gets random codes (default demo)")
    ap.add_argument("--lattice", default="9to3")
    ap.add_argument("--with_fp", action="store_true",
                    help="without --checkpoint: also time --fp_model itself")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--prompt", default="48", help="comma-separated prompt lengths")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="prefills per run (median)")
    ap.add_argument("--engines", default="hf,step")
    ap.add_argument("--dense", default=None,
                    help="dense cache settings to time (default: 0,1 on the CPU, 0 on CUDA)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="graph/compile the engines (default: on CUDA)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "chat" / "chat.csv"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_chat: --device cuda but no CUDA device; use --device cpu")
    torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    compile = device.type == "cuda" if args.compile is None else args.compile
    dense_opts = (args.dense or ("0" if device.type == "cuda" else "0,1")).split(",")
    prompts = [int(p) for p in args.prompt.split(",")]
    prov = record_fields(device=device)
    rows = []
    for name, model in _load(args, dtype, device):
        print(f"{name}: dense cache would hold {dense_cache_bytes(model, dtype) / 2**20:.0f} MiB",
              flush=True)
        for dense in dense_opts:
            if dense == "1":
                build_dense_cache(model, dtype)
            else:
                drop_dense_cache(model)
            for kind in args.engines.split(","):
                for prompt in prompts:
                    pre, dec = time_engine(model, kind, prompt=prompt, tokens=args.tokens,
                                           compile=compile, repeats=args.repeats)
                    rows.append({"model": name, "engine": kind,
                                 "dense_cache": "on" if dense == "1" else "off",
                                 "dtype": args.dtype, "device": device.type, "prompt": prompt,
                                 "tokens": args.tokens, "threads": args.threads,
                                 "compile": int(compile), "prefill_tokens_per_s": round(pre, 1),
                                 "decode_tokens_per_s": round(dec, 1), **prov})
                    print(f"  {kind} dense={dense} prompt={prompt}: prefill {pre:.1f} tok/s, "
                          f"decode {dec:.1f} tok/s", flush=True)
        del model
    if args.out:
        from liftquant.util.records import merge_csv_rows

        merge_csv_rows(args.out, rows, KEY)
    print(f"\n{prov['gpu'] or device.type}; commit {prov['commit']}"
          + (" (dirty)" if prov.get("dirty") else ""))
    print("| model | engine | dense cache | dtype | prompt | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['engine']} | {r['dense_cache']} | {r['dtype']} | "
              f"{r['prompt']} | {r['prefill_tokens_per_s']} | {r['decode_tokens_per_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
