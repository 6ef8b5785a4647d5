"""Where a stage-1 training step of one block spends its time (the largest cost of the scale
benchmark; its share of a Llama-3-8B block is measured in bench/scale/README.md).

Builds the first decoder block of a random-weight model of a real shape
(``bench_scale.build_model``), swaps its linears for stage-1 ``LiftLinear`` layers exactly as
the pipeline does (``calibrate._to_lift``), and times, with the GPU synchronised around each
repeat:

* ``dense_step``: forward + backward of the FP block (bf16 weights, no quantizer) on one batch:
  the floor a stage-1 step cannot beat;
* ``proxy_weights``: forming every layer's proxy weight ``T^-1 Q(W T)`` (forward only);
* ``proxy_weights_fwd_bwd``: the same plus its backward (a unit gradient);
* ``proxy_weights_fwd_bwd_compiled`` (``--compiled``, default on CUDA): the same with each
  layer's ``proxy_weight`` under ``torch.compile``, its first-call time and its deviation from
  the eager weights;
* ``step``: one full stage-1 step (forward + backward of the block with proxy weights, clip,
  Adam), the thing ``train_block`` repeats;
* ``stage2_step`` (``--stage2``): after a real lattice search of the block (the pipeline's
  ``round_block_to_lattice`` with its flip margin), one stage-2 step (forward + backward of the
  block in lattice mode, the straight-through latent gradients, clip, Adam), under deterministic
  kernels as the pipeline runs it and (``stage2_step_nondet``) without them;
* ``--torch_profile``: a ``torch.profiler`` table of the heaviest CUDA ops of one step of each
  stage, printed (not recorded);
* ``rotate_<variant>``: the Kronecker rotation ``P1^T X P2`` over all of the block's weight rows
  in three formulations (``broadcast``: today's ``P1.T @ X @ P2``; ``two_gemm``: two large
  GEMMs with a transpose; ``einsum``) and, on CUDA, ``broadcast`` with TF32 allowed; their
  maximal deviation from the float64 result is recorded beside the time.

Rows (one per shape, batch and sequence length; provenance recorded) merge into
``bench/scale/profile_stage1.json``. Examples::

    python scripts/profile_stage1.py --shape llama3-8b --batch 2 --seqlen 2048
    python scripts/profile_stage1.py --shape llama3-70b --batch 2 --seqlen 2048 --checkpoint_proxy
    python scripts/profile_stage1.py --shape llama-tiny --seqlen 64 --repeats 2   # CPU smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_scale import build_model

from liftquant.cli.config import RunConfig, build_parser
from liftquant.core.lattice import LatticeSpec
from liftquant.models import get_adapter
from liftquant.quantize import blocktrain
from liftquant.quantize.blocktrain import GRAD_CLIP, latent_flip_margin
from liftquant.quantize.calibrate import (
    _groups_stage1,
    _groups_stage2,
    _to_lift,
    round_block_to_lattice,
)
from liftquant.quantize.plan import MemoryPlan
from liftquant.quantize.stream import forward_block
from liftquant.util.provenance import RECORD_KEY, record_fields
from liftquant.util.records import merge_json_rows


def timed(fn, *, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def rotate_variants(layers, *, device) -> dict[str, tuple]:
    """(seconds, max abs error vs float64) of each rotation formulation over all layers."""
    cases = []
    for layer in layers.values():
        w = layer.whiten
        X = torch.nn.functional.pad(layer.weight.float(), (0, w.padded_in_features
                                                           - layer.in_features))
        cases.append((X.reshape(X.shape[0], w.n1, w.n2), w.P1().detach(), w.P2().detach()))
    ref = [(P1.double().T @ X.double() @ P2.double()) for X, P1, P2 in cases]

    def broadcast():
        return [P1.T @ X @ P2 for X, P1, P2 in cases]

    def two_gemm():
        out = []
        for X, P1, P2 in cases:
            Y = (X @ P2).transpose(1, 2).reshape(-1, P1.shape[0]) @ P1
            out.append(Y.reshape(X.shape[0], X.shape[2], X.shape[1]).transpose(1, 2))
        return out

    def einsum():
        return [torch.einsum("ij,oik,kl->ojl", P1, X, P2) for X, P1, P2 in cases]

    variants = {"broadcast": broadcast, "two_gemm": two_gemm, "einsum": einsum}
    res = {}
    for name, fn in variants.items():
        t = timed(fn, repeats=3, device=device)
        err = max(float((a.double() - b).abs().max()) for a, b in zip(fn(), ref, strict=True))
        res[name] = (t, err)
    if device.type == "cuda":
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            t = timed(broadcast, repeats=3, device=device)
            err = max(float((a.double() - b).abs().max())
                      for a, b in zip(broadcast(), ref, strict=True))
            res["broadcast_tf32"] = (t, err)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    return res


def compiled_proxy(layers, opt, *, repeats: int, device) -> dict:
    """The proxy weights (forward + backward) as the pipeline forms them with
    ``--compile_proxy`` (``LiftLinear._proxy_weight_for_step``: one compiled graph per layer
    shape): seconds, the first (compiling) call's seconds, and how far the compiled weights are
    from the eager ones (largest deviation and the fraction of entries that differ: a reordered
    float sum can move a value across a rounding level of the proxy)."""
    for layer in layers.values():
        layer.compile_proxy = True

    def fwd_bwd():
        total = sum(layer._proxy_weight_for_step().sum() for layer in layers.values())
        total.backward()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    fwd_bwd()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - t0
    t = timed(fwd_bwd, repeats=repeats, device=device)
    dev, frac = 0.0, 0.0
    with torch.no_grad():
        for layer in layers.values():
            a, b = layer.proxy_weight(), layer._proxy_weight_for_step()
            dev = max(dev, float((a - b).abs().max()))
            frac = max(frac, float((a != b).float().mean()))
            layer.compile_proxy = False
    return {"proxy_weights_fwd_bwd_compiled": round(t, 5),
            "proxy_weights_compile_first_call": round(first, 2),
            "proxy_weights_compiled_max_dev": dev, "proxy_weights_compiled_frac_diff": frac}


def torch_profile(fn, label: str, device) -> None:
    """Print the heaviest ops of one call of ``fn`` (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"--- torch.profiler: {label} ---")
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))


def stage2_timings(block, layers, run_block, cfg, args, device) -> dict:
    """Search the block's layers onto the lattice as the pipeline does, then time stage-2
    steps (deterministic kernels on and off)."""
    from liftquant.core.lattice import load_projection

    spec = LatticeSpec.parse(args.expc)
    t = cfg.train
    margin = latent_flip_margin(t.lw_lr, n_train=args.train_samples, epochs=t.epochs,
                                batch_size=args.batch)
    M = load_projection(spec).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    st = round_block_to_lattice(layers, M, method=cfg.lattice.search, margin=margin)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    search = time.perf_counter() - t0
    _, opt_groups, dense, cands, lat = blocktrain._prepare(block, _groups_stage2(layers, cfg))
    opt = torch.optim.Adam(opt_groups, betas=blocktrain.ADAM_BETAS)

    def step():
        run_block().backward()
        blocktrain._clip_(dense, cands, lat)
        opt.step()
        blocktrain._reset_grads(dense + cands, lat)

    out = {"search_seconds": round(search, 3), "candidate_fraction": st["candidate_fraction"]}
    with blocktrain._Deterministic(device.type == "cuda"):
        out["stage2_step"] = round(timed(step, repeats=args.repeats, device=device), 5)
        if args.torch_profile:
            torch_profile(step, "stage-2 step (deterministic)", device)
    out["stage2_step_nondet"] = round(timed(step, repeats=args.repeats, device=device), 5)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--expc", default="20to8")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--checkpoint_proxy", action="store_true",
                   help="recompute proxy weights in backward (the 70B memory plan's setting)")
    p.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the proxy weights under torch.compile (default: on CUDA)")
    p.add_argument("--stage2", action="store_true",
                   help="also search the block onto the lattice and time a stage-2 step")
    p.add_argument("--train_samples", type=int, default=115,
                   help="training samples the stage-2 flip margin assumes (128 minus holdout)")
    p.add_argument("--torch_profile", action="store_true",
                   help="print a torch.profiler table of one step of each stage")
    p.add_argument("--out", default=str(ROOT / "bench" / "scale" / "profile_stage1.json"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, _ = build_model(args.shape, 1)
    adapter = get_adapter(model.config)
    block = adapter.get_blocks(model)[0].to(device)
    if device.type == "cpu":
        block = block.float()  # as the pipeline on CPU (no bf16 autocast there)
    rotary = model.model.rotary_emb.to(device)
    cfg = RunConfig.from_args(build_parser("profile_stage1").parse_args(
        ["--model", f"random:{args.shape}", "--expc", args.expc]))
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, args.seqlen, model.config.hidden_size, generator=gen,
                    device=device, dtype=dtype)
    y = torch.randn_like(x)
    pos = torch.arange(args.seqlen, device=device)[None].expand(args.batch, -1)
    emb = rotary(x, pos)
    for prm in block.parameters():
        prm.requires_grad_(False)

    def run_block():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = forward_block(block, x, {"position_embeddings": emb, "position_ids": pos})
        return (out.float() - y.float()).square().mean()

    # the floor: the FP block with its weights trainable (so backward forms weight gradients)
    lins = [adapter.get_linear(block, n) for g in adapter.block_groups(block) for n in g]
    for lin in lins:
        lin.weight.requires_grad_(True)
    dense_step = timed(lambda: run_block().backward(), repeats=args.repeats, device=device)
    for lin in lins:
        lin.weight.requires_grad_(False)
        lin.weight.grad = None

    plan = MemoryPlan(micro_batch=args.batch, checkpoint_proxy=args.checkpoint_proxy,
                      estimate_gib={}, budget_gib=None)
    layers = _to_lift(block, adapter, {}, LatticeSpec.parse(args.expc), cfg, plan)
    groups = _groups_stage1(layers, cfg)
    params = [q for g in groups for q in g["params"]]
    opt = torch.optim.Adam(groups)

    def proxy_fwd():
        with torch.no_grad():
            for layer in layers.values():
                layer.proxy_weight()

    def proxy_fwd_bwd():
        total = sum(layer.proxy_weight().sum() for layer in layers.values())
        total.backward()
        opt.zero_grad(set_to_none=True)

    def step():
        run_block().backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    row = {"shape": args.shape, "lattice": args.expc, "batch": args.batch,
           "seqlen": args.seqlen, "device": device.type, "dtype": str(dtype).replace("torch.", ""),
           "checkpoint_proxy": args.checkpoint_proxy,
           "weights_per_block": sum(lin.weight.numel() for lin in lins),
           "dense_step": round(dense_step, 5),
           "proxy_weights": round(timed(proxy_fwd, repeats=args.repeats, device=device), 5),
           "proxy_weights_fwd_bwd": round(timed(proxy_fwd_bwd, repeats=args.repeats,
                                                device=device), 5),
           "step": round(timed(step, repeats=args.repeats, device=device), 5)}
    if args.compiled if args.compiled is not None else device.type == "cuda":
        row.update(compiled_proxy(layers, opt, repeats=args.repeats, device=device))
    if args.torch_profile:
        with blocktrain._Deterministic(device.type == "cuda"):
            torch_profile(step, "stage-1 step (deterministic)", device)
    for name, (t, err) in rotate_variants(layers, device=device).items():
        row[f"rotate_{name}"] = round(t, 5)
        row[f"rotate_{name}_max_err"] = err
    row["stage2"] = args.stage2
    if args.stage2:
        row.update(stage2_timings(block, layers, run_block, cfg, args, device))
    row.update(record_fields(device=device if device.type == "cuda" else None))
    merge_json_rows(args.out, [row], ("shape", "lattice", "batch", "seqlen", "device",
                                      "checkpoint_proxy", "stage2", *RECORD_KEY))
    width = max(len(k) for k in row)
    for k, v in row.items():
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
