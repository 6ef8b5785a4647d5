"""Batch-1 int1 GEMV / fused-layer microbenchmarks on the GPU -> bench/kernels/kernels.csv (SPEC §8).

For every Llama-3 8B/70B weight shape and lattice, with random packed weights:

* kernel rows are per-call times of back-to-back calls over rotating inputs in one CUDA graph
  (since commit 1f3e136; before, ``do_bench`` medians with L2 cleared) against cuBLAS fp16
  ``F.linear`` of the original shape timed the same way. The GEMV tuner
  (``liftquant.kernels.gemv_tuner``) times all its candidates first; the rows re-time its best
  overall (``triton-gemv``), best split-K row stream (``triton-gemv-splitk``), best row tile
  (``triton-gemv-rowtile``, the previous kernel) and the best split-K configuration without
  inline PTX (``triton-gemv-splitk-noasm``) and the lookup-table GEMV (``triton-gemv-lut``,
  ``kernels.gemv_lut``, its partial sums reduced by torch); ``kernel`` names the configuration;
* layer rows (``triton-transform``/``torch-transform``: T* alone; ``triton``/``torch``: the
  backends' whole ``linear``) are per-call times of back-to-back calls in one CUDA graph, as a
  graphed decode step runs them, against fp16 ``F.linear`` timed the same way.

Inputs rotate over enough weight copies (> 3x L2) that weights never stay in L2.
``fraction_of_copy`` = packed-weight bytes / time over the measured device-to-device copy rate
(bytes read + written). ``python scripts/bench_kernels.py --out bench/kernels/kernels.csv``
"""

from __future__ import annotations

import argparse
import dataclasses
from itertools import cycle

import torch
import torch.nn.functional as F

from liftquant.core.linear import PackedLiftLinear
from liftquant.kernels import gemv_tuner, registry
from liftquant.kernels import triton_int1 as ti
from liftquant.kernels.gemv_splitk import SplitKConfig
from liftquant.util.provenance import RECORD_KEY, record_fields
from liftquant.util.records import merge_csv_rows, merge_json_rows

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192), (8192, 28672)]
# Sibling groups run as one T* and one GEMV launch (liftquant.engine.groups): (name, member
# rows, in_features) of Llama-3 8B and 70B.
GROUPS = [("qkv", (4096, 1024, 1024), 4096), ("gate_up", (14336, 14336), 4096),
          ("qkv", (8192, 1024, 1024), 8192), ("gate_up", (28672, 28672), 8192)]
LATTICES = ["16to8", "24to10", "20to8", "24to8"]
# Lookup-table GEMV configurations timed per shape (kernels.gemv_lut.LutConfig: bytes per
# K-slice, rows per step, rows per program, warps); the fastest is the triton-gemv-lut row.
LUT_CONFIGS = None  # filled in main() (imports Triton-side modules lazily)
ROTATE_BYTES = 200 * 2**20  # > 3x the H100's 50 MB L2
COLUMNS = ["shape", "config", "backend", "time_us", "weight_gbps", "copy_gbps", "fraction_of_copy",
           "fp16_time_us", "speedup_vs_fp16", "gpu", "commit", "kernel"]
KEY = ("shape", "config", "backend", *RECORD_KEY)  # other commits' and GPUs' rows are kept


@torch.no_grad()
def fill_random_(layer: PackedLiftLinear, seed: int = 0) -> PackedLiftLinear:
    """Random codes and well-scaled random side tensors, in place (no calibration)."""
    dev = layer.packed_signs.device
    g = torch.Generator(device=dev).manual_seed(seed)
    n1, n2 = layer.block_shape
    layer.packed_signs.copy_(torch.randint(0, 256, layer.packed_signs.shape, generator=g,
                                           device=dev, dtype=torch.uint8))
    layer.scale.fill_(1.0 / layer.lifted_width**0.5)
    layer.s1.fill_(1.0)
    layer.s2_act.fill_(1.0)
    layer.L.copy_(torch.randn(n1, n1, generator=g, device=dev) / n1**0.5)
    layer.R.copy_(torch.randn(*layer.R.shape, generator=g, device=dev) / n2**0.5)
    if layer.bias is not None:
        layer.bias.zero_()
    return layer


def random_packed_layer(n: int, N: int, spec: str, *, device="cuda", seed: int = 0):
    return fill_random_(PackedLiftLinear(n, N, spec=spec, device=device), seed)


def graph_bench(fn, args: list, min_calls: int = 16) -> float:
    """Per-call time (us) of back-to-back calls over rotating args captured in one CUDA graph
    (``gemv_tuner.graph_time``, the tuner's method): what a graphed decode step pays, launch
    gaps included, no host overhead. Kernel rows use it too since commit 1f3e136: do_bench with
    L2 cleared per run gave one configuration times an order of magnitude apart within one run
    (bench/kernels/README.md, fourth run)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: builds kernels, tunes GEMV shapes
        for a in args[:3]:
            fn(*a)
    torch.cuda.current_stream().wait_stream(stream)
    return gemv_tuner.graph_time(fn, args, min_calls) * 1e3


def copy_gbps() -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    t = graph_bench(lambda a, b: b.copy_(a), [(x, y)])
    return 2 * x.numel() / t / 1e3  # read + write, GB/s


def bench_shape(N: int, n: int, spec: str, rows: list, sweep_log: dict, base: dict) -> None:
    dt = torch.bfloat16
    proto = random_packed_layer(n, N, spec)
    wbytes = proto.packed_signs.numel()
    copies = max(1, -(-ROTATE_BYTES // wbytes))
    layers = [proto] + [random_packed_layer(n, N, spec, seed=i + 1) for i in range(copies - 1)]
    xs = [torch.randn(1, n, device="cuda", dtype=dt) for _ in layers]
    d, D = proto.spec.target_dim, proto.spec.lifted_dim
    side = [(ly.s1, ly.L, ly.R, ly.s2_act) for ly in layers]
    pairs = [ti.launch_transform(x, *s, d=d, D=D, pairs=True) for x, s in zip(xs, side)]
    w16 = torch.randn(N, n, device="cuda", dtype=torch.float16)
    w16s = [w16] + [torch.randn_like(w16) for _ in range(-(-ROTATE_BYTES // w16.numel() // 2) - 1)]
    f16_args = [(x.half(), w) for x, w in zip(cycle(xs), w16s)]
    t16 = graph_bench(F.linear, f16_args)  # kernel and layer rows compare with this

    gemv_args = [(xp, wsc, ly) for (xp, wsc), ly in zip(pairs, layers)]
    kernel, labels = tune_gemv(gemv_args, dt, sweep_log, f"{N}x{n}/{spec}")
    from liftquant.kernels.gemv_lut import launch_gemv_lut

    plain = [ti.launch_transform(x, *s, d=d, D=D, pairs=False)[0] for x, s in zip(xs, side)]
    lut = {cfg: graph_bench(  # the lookup-table GEMV, its partials reduced by torch
        lambda xs_, ly, c=cfg: launch_gemv_lut(xs_, ly.packed_signs, ly.scale, None, dt, cfg=c),
        list(zip(plain, layers))) for cfg in LUT_CONFIGS}
    best = min(lut, key=lut.get)
    kernel["triton-gemv-lut"] = lut[best]
    labels["triton-gemv-lut"] = best.label
    sweep_log.setdefault(f"{N}x{n}/{spec}", {})["lut_us"] = {c.label: t for c, t in lut.items()}
    layer = {
        "triton-transform": graph_bench(lambda x, s: ti.launch_transform(x, *s, d=d, D=D,
                                                                         pairs=True),
                                        list(zip(xs, side))),
        "torch-transform": graph_bench(lambda x, ly: ly.fused_input(x), list(zip(xs, layers))),
        "triton": graph_bench(registry.get_backend("triton", "cuda").linear,
                              list(zip(layers, xs))),
        "torch": graph_bench(registry.get_backend("torch", "cuda").linear,
                             list(zip(layers, xs))[:4], min_calls=4),
    }
    for backend, t in {**kernel, **layer}.items():
        add_row(rows, base, f"{N}x{n}", spec, backend, t, wbytes, t16, labels.get(backend, ""))


def add_row(rows: list, base: dict, shape: str, spec: str, backend: str, t: float,
            wbytes: int, t16: float, kernel: str = "") -> None:
    """One ``kernels.csv`` row (time ``t`` us for ``wbytes`` packed bytes, fp16 time ``t16``),
    also printed."""
    gbps = wbytes / t / 1e3
    rows.append({**base, "shape": shape, "config": spec, "backend": backend,
                 "time_us": f"{t:.2f}", "weight_gbps": f"{gbps:.1f}",
                 "fraction_of_copy": f"{gbps / base['copy_gbps']:.3f}",
                 "fp16_time_us": f"{t16:.2f}", "speedup_vs_fp16": f"{t16 / t:.2f}",
                 "kernel": kernel})
    print(f"{shape} {spec:>6} {backend:>24} {t:9.2f} us {gbps:7.1f} GB/s "
          f"frac {gbps / base['copy_gbps']:.3f} fp16 {t16:8.2f} us x{t16 / t:.2f} {kernel}",
          flush=True)


def bench_group(name: str, members: tuple, n: int, spec: str, rows: list, base: dict) -> None:
    """Layer rows of a sibling group: ``triton-group`` (one grouped T* and one grouped GEMV)
    against ``triton-members`` (the same layers one by one), both in one CUDA graph over
    rotating weights, and fp16 ``F.linear`` per member timed the same way."""
    from liftquant.engine.groups import PackedGroup

    dt = torch.bfloat16
    proto = [random_packed_layer(n, N, spec, seed=i) for i, N in enumerate(members)]
    wbytes = sum(ly.packed_signs.numel() for ly in proto)
    sets = [proto] + [[random_packed_layer(n, N, spec, seed=100 * c + i)
                       for i, N in enumerate(members)]
                      for c in range(1, max(1, -(-ROTATE_BYTES // wbytes)))]
    groups = [PackedGroup(s) for s in sets]
    for g in groups:
        registry.set_backend(g, "triton")
    xs = [torch.randn(1, n, device="cuda", dtype=dt) for _ in groups]
    w16 = [[torch.randn(N, n, device="cuda", dtype=torch.float16) for N in members]
           for _ in range(max(1, -(-ROTATE_BYTES // (2 * n * sum(members)))))]
    t16 = graph_bench(lambda x, ws: [F.linear(x, w) for w in ws],
                      [(x.half(), ws) for x, ws in zip(cycle(xs), w16)])
    times = {
        "triton-group": graph_bench(lambda x, g: g(x), list(zip(xs, groups))),
        "triton-members": graph_bench(lambda x, g: [m(x) for m in g.layers],
                                      list(zip(xs, groups))),
    }
    shape = f"{name}:{'+'.join(map(str, members))}x{n}"
    for backend, t in times.items():
        add_row(rows, base, shape, spec, backend, t, wbytes, t16)


def tune_gemv(gemv_args: list, dt: torch.dtype, sweep_log: dict, name: str):
    """Tune the shape with the Triton backend's tuner (whose choice the layer rows then use)
    and re-time the best configuration of each kind over rotating inputs."""
    tuner = registry.get_backend("triton", "cuda").tuner
    xp, wsc, ly = gemv_args[0]
    args = (xp, wsc, ly.packed_signs, ly.scale, None, dt)
    key = tuner.key(xp, ly.packed_signs, None, dt)
    best = tuner.cache.get(key, lambda: tuner.tune(args, key=key))
    timings = tuner.timings.get(key, {})
    n_sm = torch.cuda.get_device_properties(xp.device).multi_processor_count
    by_label = {c.label: c for c in tuner.candidates(key, n_sm, tuner.asm_failed is None)}
    kinds = {"triton-gemv": best}
    for kind, cls in (("triton-gemv-splitk", SplitKConfig), ("triton-gemv-rowtile", None)):
        labels = [lb for lb in timings if isinstance(by_label.get(lb), cls or ti.GemvConfig)]
        if labels:
            kinds[kind] = by_label[min(labels, key=timings.get)]
    if "triton-gemv-splitk" in kinds:
        kinds["triton-gemv-splitk-noasm"] = dataclasses.replace(kinds["triton-gemv-splitk"],
                                                                use_asm=False)
    sweep_log[name] = {"best": best.label, "times_us": timings,
                       "rejected": tuner.rejected.get(key, {})}

    def run(cfg):
        return lambda xp, wsc, ly: gemv_tuner.launch_config(cfg, xp, wsc, ly.packed_signs,
                                                            ly.scale, None, dt)

    times = {kind: graph_bench(run(cfg), gemv_args) for kind, cfg in kinds.items()}
    return times, {kind: cfg.label for kind, cfg in kinds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    ap.add_argument("--out", default="bench/kernels/kernels.csv")
    ap.add_argument("--sweep-json", default=None, help="also write the GEMV config sweep here")
    ap.add_argument("--lattices", default=",".join(LATTICES))
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,28672x8192 (out x in)")
    ap.add_argument("--groups", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the q/k/v and gate/up groups (liftquant.engine.groups)")
    args = ap.parse_args()
    torch.manual_seed(0)
    global LUT_CONFIGS
    from liftquant.kernels.gemv_lut import LutConfig

    LUT_CONFIGS = [LutConfig(32, 16, 256, 4), LutConfig(16, 16, 512, 4),
                   LutConfig(64, 16, 256, 8), LutConfig(32, 32, 1024, 8)]
    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split("x")))
                                             for s in args.shapes.split(",")]
    base = {**record_fields(device="cuda"), "copy_gbps": round(copy_gbps(), 1)}
    print(f"{base['gpu']}: copy {base['copy_gbps']} GB/s (read + write)", flush=True)
    rows, sweep_log = [], {}
    jobs = [(bench_shape, (N, n)) for N, n in shapes]
    if args.groups:
        jobs += [(bench_group, g) for g in GROUPS if g[2] in {n for _, n in shapes}]
    for fn, shape in jobs:
        for spec in args.lattices.split(","):
            if fn is bench_shape:
                bench_shape(*shape, spec, rows, sweep_log, base)
            else:
                bench_group(*shape, spec, rows, base)
            torch.cuda.empty_cache()
            merge_csv_rows(args.out, rows, KEY, columns=COLUMNS)  # as rows arrive
            if args.sweep_json:
                merge_json_rows(args.sweep_json, [{"name": name, **entry, **base}
                                                  for name, entry in sweep_log.items()],
                                ("name", *RECORD_KEY))


if __name__ == "__main__":
    main()
