#!/usr/bin/env bash
# The demo model on the GPU in two calls on one warm machine (issue 5):
#   STAGE=stage  carry .assets/p1 .assets/snap .assets/gw: unpack the snapshot to /tmp/w, keep
#                GGUF part 1 in $SCR, install the gguf wheel into /tmp/site; then CUDA tests
#                (TESTS adds files, TEST_K filters) and, with DECODE8B=1, the 8B decode rows.
#   STAGE=chat   carry .assets/p2: reassemble + convert the demo, quantize it at 20to8, chat
#                with the step engine (two turns) and the HF engine (one), and time the
#                checkpoint's decode against its bf16 original.
# Run from /tmp/w (STAGE=stage unpacks it). Results: $OUT/chat_round.tar.gz.
set -u
SCR=${SCR:-/tmp/lq_scratch}; R=$OUT/chat_round; mkdir -p "$R" "$SCR/home/files/smollm2-135m"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  LIFTQUANT_HOME=$SCR/home
Q=$SCR/q_20to8
if [ "${STAGE}" = stage ]; then
  cp .assets/p1/gguf.part00 "$SCR/" && pip install -q --no-deps --target /tmp/site .assets/gw/*.whl
  timeout ${TESTS_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/test_groups.py \
    tests/test_fused_small.py tests/test_pdl.py tests/test_prologue.py ${TESTS:-} \
    -k "${TEST_K:-cuda}" > "$R/tests.log" 2>&1
  echo "tests rc=$?"; grep -E "^FAILED|passed|failed" "$R/tests.log" | tail -5
  if [ "${DECODE8B:-0}" = 1 ]; then  # the 8B-shaped rows of bench/decode.csv
    timeout 240 python3 scripts/bench_decode.py --out "$R/decode8b.csv" > "$R/decode8b.log" 2>&1
    grep tok/s "$R/decode8b.log"
  fi
  if [ "${SWEEP:-0}" = 1 ]; then
    timeout 150 python3 scripts/sweep_transform.py --json "$R/transform_sweep.json" > "$R/sweep.log" 2>&1
    grep -A14 "^best per" "$R/sweep.log"
  fi
else
  G=$SCR/home/files/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f "$G" ] || cat "$SCR/gguf.part00" .assets/p2/gguf.part01 > "$G"
  echo "$(cat .assets/p2/gguf.sha256)  $G" | sha256sum -c - || exit 3
  tar xzf .assets/p2/assets.tar.gz -C "$SCR/home"
  python3 -m liftquant.assets fetch smollm2-135m wiki-offline --convert > "$R/assets.log" 2>&1 || exit 4
  [ -f "$Q/config.json" ] || python3 main.py --model demo --expc 20to8 --save_dir "$Q" \
    > "$R/quantize.log" 2>&1
  echo "quantize rc=$?"; grep -i "ppl\|perplex" "$R/quantize.log" | tail -3
  for eng in step hf; do
    P=(--prompt "What is the capital of France? Answer in one sentence.")
    [ $eng = step ] && P+=(--prompt "Name three primary colors.")
    timeout 150 python3 chat/chat_bitblas_compile.py --quant_model_path "$Q" --backend triton \
      --engine $eng --max_new_tokens 128 "${P[@]}" > "$R/chat_$eng.log" 2>&1
    echo "chat $eng rc=$?"; grep -h "tok/s\|^assistant\|engine\|arning" "$R/chat_$eng.log" | head -12
  done
  timeout 150 python3 scripts/bench_decode.py --out "$R/decode_demo.csv" --lattices "" \
    --checkpoint "$Q" --fp_model demo --model_name smollm2-135m > "$R/decode_demo.log" 2>&1
  grep tok/s "$R/decode_demo.log"
fi
tar czf "$OUT/chat_round.tar.gz" -C "$OUT" chat_round
