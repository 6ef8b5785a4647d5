#!/usr/bin/env bash
# Demo-model chat and decode speed, plus the 32to16 Lloyd polish (issues 5 and 2), in two calls
# on one warm GPU machine, after a call that staged part 1 of the demo GGUF in $SCR (gguf.part00)
# and the wheels in /tmp/site (scripts/gpu_stage_a.sh's first lines, or by hand).
#   STAGE=quant  carry .assets/p2: reassemble + convert the demo, quantize it at 20to8 with
#                main.py, chat with it (two turns, Triton backend); meanwhile on the same GPU
#                Lloyd-polish lattice/32to16.pt with 4 and with 8 null-space bases, and measure
#                the results with 4, 6 and 8 bases.
#   STAGE=bench  (quiet GPU) decode tokens/s of that checkpoint against its bf16 original, and
#                bench_lattice.py for 30to14 and 32to16 (4-basis rows included).
#   SCR=/tmp/lq_scratch OUT=... STAGE=quant bash scripts/gpu_chat_demo.sh
set -u
OUT=${OUT:-/tmp/lq_out}; SCR=${SCR:-/tmp/lq_scratch}; L=$OUT/logs
mkdir -p "$L" "$SCR/home/files/smollm2-135m" "$SCR/lloyd"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  LIFTQUANT_HOME=$SCR/home
Q=$SCR/q_20to8
if [ "${STAGE:-quant}" = quant ]; then
  G=$SCR/home/files/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f "$G" ] || cat "$SCR/gguf.part00" .assets/p2/gguf.part01 > "$G"
  echo "$(cat .assets/p2/gguf.sha256)  $G" | sha256sum -c - || exit 3
  tar xzf .assets/p2/assets.tar.gz -C "$SCR/home"
  python3 -m liftquant.assets fetch smollm2-135m wiki-offline --convert > "$L/assets.log" 2>&1 || exit 4
  for b in 4 8; do
    ( timeout "${LLOYD_S:-520}" python3 lattice_generator.py --expc 32to16 --init lattice/32to16.pt \
        --steps 0 --lloyd "${ITERS:-14}" --lloyd_n "${N:-2000000}" --bases "$b" --seed "$b" \
        --time_limit "${LLOYD_SOFT:-400}" --device cuda --no_progress \
        --output "$SCR/lloyd/32to16_b$b.pt" --index "$SCR/lloyd/32to16_b$b.json"
      for e in 4 6 8; do
        python3 lattice_generator.py --expc 32to16 --eval "$SCR/lloyd/32to16_b$b.pt" --bases "$e" \
          --device cuda
      done ) > "$L/lloyd_b$b.log" 2>&1 &
  done
  [ -f "$Q/config.json" ] || python3 main.py --model demo --expc 20to8 --save_dir "$Q" \
    > "$L/quantize.log" 2>&1
  echo "quantize rc=$?" >> "$L/status.txt"
  timeout 200 python3 chat/chat_bitblas_compile.py --quant_model_path "$Q" --backend triton \
    --max_new_tokens 128 --prompt "What is the capital of France? Answer in one sentence." \
    --prompt "Name three primary colors." > "$L/chat.log" 2>&1
  echo "chat rc=$?" >> "$L/status.txt"
  wait
  cp "$SCR"/lloyd/* "$OUT/" 2>/dev/null
  { cat "$L/status.txt"; grep -h "tok/s\|^assistant\|loaded" "$L/chat.log"
    grep -h "mse" "$L"/lloyd_b*.log | grep -v INFO; } | tee "$OUT/summary.txt"
else
  timeout 200 python3 scripts/bench_decode.py --out "$OUT/decode.csv" --lattices "" \
    --checkpoint "$Q" --fp_model demo --model_name smollm2-135m > "$L/decode.log" 2>&1
  echo "decode rc=$?" >> "$L/status.txt"
  timeout 200 python3 scripts/bench_lattice.py --lattices "${LATTICES:-30to14,32to16}" \
    --output "$OUT/lattice.csv" > "$L/bench_lattice.log" 2>&1
  echo "bench_lattice rc=$?" >> "$L/status.txt"
  { cat "$L/status.txt"; cat "$OUT/decode.csv" "$OUT/lattice.csv"; } | tee "$OUT/summary.txt"
fi
cd "$OUT" && tar czf "logs_${STAGE:-quant}.tar.gz" logs && rm -rf logs
