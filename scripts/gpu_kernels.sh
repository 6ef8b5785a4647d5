#!/usr/bin/env bash
# Decode kernels on the GPU machine (issue 5), one call, under 7 minutes:
#   1. CUDA kernel tests (every GEMV tuner candidate against the torch reference, CUDA graphs),
#   2. bench_kernels.py: batch-1 GEMV / layer microbenchmarks -> $OUT/kernels.csv,
#   3. bench_decode.py: Llama-3-8B-shaped decode, bf16 vs 24to10 and 20to8, plus the demo
#      checkpoint $CKPT against its bf16 original (FP_MODEL, default demo) if set -> decode.csv,
#   4. with $CKPT: chat/chat_bitblas_compile.py, two turns, Triton backend -> logs/chat.log,
# then prints a short table ($OUT/summary.txt). Logs end up in $OUT/logs.tar.gz.
#   OUT=/tmp/lq_out [CKPT=/path/to/quantized_demo] bash scripts/gpu_kernels.sh
set -u
OUT=${OUT:-/tmp/lq_out}; FP_MODEL=${FP_MODEL:-demo}; CKPT=${CKPT:-}
LOGS=$OUT/logs; mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=$PWD
# Per-step limits (s): 100 + 120 + 170 + 110 plus kill grace stays under 9 minutes; the benches
# write their CSVs row by row, so a step cut short still leaves its finished rows.
step() {  # name, limit, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  echo "$name rc=$? $((SECONDS - t0))s" | tee -a "$LOGS/status.txt"
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv > "$LOGS/gpu.txt" 2>&1
step tests 100 python3 -m pytest -rs tests/test_kernels.py -k "cuda or reference or registry or backend"
step kernels 120 python3 scripts/bench_kernels.py --out "$OUT/kernels.csv" \
  --sweep-json "$OUT/gemv_sweep.json"
step decode 170 python3 scripts/bench_decode.py --out "$OUT/decode.csv" --lattices 24to10,20to8 \
  ${CKPT:+--checkpoint "$CKPT" --fp_model "$FP_MODEL"}
if [ -n "$CKPT" ]; then
  step chat 110 python3 chat/chat_bitblas_compile.py --quant_model_path "$CKPT" --backend triton \
    --max_new_tokens 128 --prompt "What is the capital of France? Answer in one sentence." \
    --prompt "Write a short Python function that returns the n-th Fibonacci number."
fi
python3 - "$OUT" > "$OUT/summary.txt" 2>&1 <<'EOF'
import csv, os, re, sys
out = sys.argv[1]
print(open(os.path.join(out, "logs", "status.txt")).read().strip())
lines = open(os.path.join(out, "logs", "tests.log")).read().splitlines()
print("tests:", *[ln for ln in lines if re.search(r"\d+ (passed|failed)|error", ln)][-1:])
chat = os.path.join(out, "logs", "chat.log")
if os.path.exists(chat):
    print("chat:", *[ln for ln in open(chat).read().splitlines() if "tok/s" in ln][-4:], sep="\n  ")
def rows(name):
    path = os.path.join(out, name)
    return list(csv.DictReader(open(path))) if os.path.exists(path) else []
kern = {}
for r in rows("kernels.csv"):
    kern.setdefault((r["shape"], r["config"]), {})[r["backend"]] = r
print(f"\n{'shape':>11} {'lattice':>7} | GEMV us  frac  xfp16 | splitk frac | rowtile frac | "
      f"layer xfp16 | best GEMV config")
for (shape, lat), b in kern.items():
    g, s, t, l = (b.get(k, {}) for k in ("triton-gemv", "triton-gemv-splitk",
                                         "triton-gemv-rowtile", "triton"))
    print(f"{shape:>11} {lat:>7} | {g.get('time_us', '-'):>7} {g.get('fraction_of_copy', '-'):>5} "
          f"{g.get('speedup_vs_fp16', '-'):>5} | {s.get('fraction_of_copy', '-'):>11} | "
          f"{t.get('fraction_of_copy', '-'):>12} | {l.get('speedup_vs_fp16', '-'):>11} | "
          f"{g.get('kernel', '')}")
print(f"\n{'model':>16} {'config':>7} {'backend':>13} {'tok/s':>7} {'x bf16':>6} {'peak GB':>7}")
for r in rows("decode.csv"):
    print(f"{r['model']:>16} {r['config']:>7} {r['backend']:>13} {r['decode_tokens_per_s']:>7} "
          f"{r['speedup']:>6} {r['peak_mem_gb']:>7}  (compile: {r['compile']})")
EOF
cat "$OUT/summary.txt"
cd "$OUT" && tar czf logs.tar.gz logs && rm -rf logs
