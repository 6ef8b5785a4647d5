"""A/B decode tokens/s of the kernel switches on one model (PDL, the one-launch small path, the
transform's PDL trigger, the norm / SiLU prologues).

For each shape (random weights, ``profile_decode.shape_config``) it builds the bf16 model and
the packed model once, compiles one decode step per model, and captures one CUDA graph per
variant: each variant is a ``KernelPolicy`` (the process policy with the switches replaced),
set on the packed layers before the capture (``registry.set_backend(..., policy=...)``), so
each variant runs its own backend instance (tuner, workspaces) and nothing is patched. Variants are timed in ``--rounds``
interleaved rounds, so a drift of the GPU clocks shows as spread, not as a difference; the
table gives the median and the range.

    python scripts/bench_variants.py --shapes smollm2-135m,qwen2.5-0.5b --json $OUT/variants.json
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch
from bench_decode import PROMPT, WARMUP, build_model, max_len
from profile_decode import shape_config

from liftquant.engine.graph import GraphedDecode
from liftquant.engine.step import DecodeStep
from liftquant.kernels import registry
from liftquant.kernels.policy import PDL_MAX_GEMV_BYTES, KernelPolicy, default_policy
from liftquant.util.provenance import RECORD_KEY, record_fields
from liftquant.util.records import merge_json_rows

# switch -> (KernelPolicy field, its values for 0 and 1): PDL launches, the one-launch small
# path, whether the transform lets its GEMV launch at its start (else once its loads are
# issued), the decode step's norm / SiLU prologues inside T*, and PDL for GEMVs of any size.
SWITCHES = {"pdl": ("pdl", (False, True)),
            "fused": ("fused_small", ("0", "1")),
            "early": ("pdl_early", (False, True)),
            "prologue": ("fuse_prologues", (False, True)),
            "pdl_big": ("pdl_max_gemv_bytes", (PDL_MAX_GEMV_BYTES, 1 << 62))}


def variants(names: str) -> list[tuple[str, dict]]:
    """'pdl,fused' -> every on/off combination of those switches, as (label, settings)."""
    switches = [s for s in names.split(",") if s]
    unknown = set(switches) - set(SWITCHES)
    if unknown:
        raise ValueError(f"unknown switches {sorted(unknown)}: use {', '.join(SWITCHES)}")
    out = []
    for values in itertools.product((1, 0), repeat=len(switches)):
        settings = dict(zip(switches, values))
        out.append((" ".join(f"{k}={v}" for k, v in settings.items()) or "default", settings))
    return out


def policy_for(settings: dict, base: KernelPolicy | None = None) -> KernelPolicy:
    """The variant's policy: ``base`` (the process policy) with the switches replaced."""
    changes = {SWITCHES[name][0]: SWITCHES[name][1][value] for name, value in settings.items()}
    return (base or default_policy()).replace(**changes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    ap.add_argument("--shapes", default="smollm2-135m")
    ap.add_argument("--lattice", default="20to8")
    ap.add_argument("--switches", default="pdl,fused")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    combos = variants(args.switches)
    results = []
    for shape in args.shapes.split(","):
        cfg = shape_config(shape)
        models = [("bf16", build_model(cfg, None, "torch"), [("bf16", {})])]
        models.append((args.lattice, build_model(cfg, args.lattice, "triton"), combos))
        for config, model, combos_here in models:
            # Every variant decodes the same positions: the step attends over its whole
            # static cache (masked), so its cost grows with max_len, which is one for all.
            step = DecodeStep(model, max_len(args.tokens), compile_mode="default")
            step.prefill(torch.randint(0, cfg.vocab_size, (1, PROMPT), device="cuda"))
            times = {label: [] for label, _ in combos_here}
            for _ in range(args.rounds):
                for label, settings in combos_here:
                    registry.set_backend(model, "triton", policy=policy_for(settings))
                    step.pos.fill_(PROMPT)
                    graphed = GraphedDecode(step, warmup=WARMUP)
                    graphed.tokens_per_s(args.tokens // 4)
                    times[label].append(graphed.tokens_per_s(args.tokens))
                    del graphed
            for label, tps in times.items():
                results.append({"shape": shape, "config": config, "variant": label,
                                "tokens_per_s": tps, "median": statistics.median(tps)})
            del model, step
            torch.cuda.empty_cache()
    prov = record_fields(device="cuda")
    if args.json:  # a list of rows; rows of other commits, GPUs and variants are kept
        merge_json_rows(args.json, [{**r, **prov} for r in results],
                        ("shape", "config", "variant", *RECORD_KEY))
    print(f"{prov['gpu']}, commit {prov['commit']}" + (" (dirty)" if prov["dirty"] else ""))
    print(f"{'shape':14} {'config':7} {'variant':16} {'tok/s':>7} {'min':>7} {'max':>7} "
          f"{'x bf16':>6}")
    for r in results:
        ref = next(x["median"] for x in results if x["shape"] == r["shape"]
                   and x["config"] == "bf16")
        print(f"{r['shape']:14} {r['config']:7} {r['variant']:16} {r['median']:7.1f} "
              f"{min(r['tokens_per_s']):7.1f} {max(r['tokens_per_s']):7.1f} "
              f"{r['median'] / ref:6.2f}")


if __name__ == "__main__":
    main()
