#!/usr/bin/env bash
# Call A of a GPU session (H100): stage part 1 of the demo GGUF and the lm-eval wheels in a
# scratch folder that the next calls reuse, check that lm-eval imports, then the lattice work:
# the search benchmark (bench/lattice.csv), the MSE of the shipped 32to16 against the number of
# null-space bases, and a refinement run of 32to16 from the shipped matrix (kept only if better).
#   SCR=/tmp/lq_scratch OUT=... bash scripts/gpu_stage_a.sh
# Carry: .assets/p1 (gguf.part00), .whl (wheels). Everything under $OUT/a.tar.gz + summary.txt.
set -u
OUT=${OUT:-/tmp/lq_out}; SCR=${SCR:-/tmp/lq_scratch}; L=$OUT/logs
mkdir -p "$SCR/whl" "$L" lattice/parts
cp .assets/p1/gguf.part00 "$SCR/" && cp .whl/*.whl "$SCR/whl/"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$SCR"/whl/*.whl \
  > "$L/pip.log" 2>&1
export PYTHONPATH=/tmp/site
python3 -c "import lm_eval, datasets, gguf; print('lm_eval', lm_eval.__version__, 'datasets', datasets.__version__)" \
  > "$L/imports.log" 2>&1; echo "imports rc=$?" >> "$L/imports.log"
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv > "$L/gpu.txt" 2>&1
timeout 150 python3 scripts/bench_lattice.py --output bench/lattice.csv > "$L/bench.log" 2>&1
echo "bench rc=$?" >> "$L/bench.log"
for b in ${BASES:-4 6 8 12}; do
  cp lattice/index.json "$SCR/index_b$b.json"
  timeout 90 python3 lattice_generator.py --expc 32to16 --eval lattice/32to16.pt --bases "$b" \
    --register --index "$SCR/index_b$b.json" --device cuda >> "$L/bases.log" 2>&1
  cp "$SCR/index_b$b.json" "$L/"
done
LG_ARGS=${LG_ARGS:-"--steps 5000 --restarts 4 --tau_final 10,60"}
timeout ${TRAIN_S:-330} python3 lattice_generator.py --expc 32to16 $LG_ARGS --budget 134217728 \
  --init lattice/32to16.pt --keep_better --time_limit ${TRAIN_SOFT:-220} \
  --hard_time_limit ${TRAIN_HARD:-290} --output "$SCR/32to16_new.pt" \
  --index lattice/parts/32to16.json --device cuda --no_progress > "$L/train.log" 2>&1
echo "train rc=$?" >> "$L/train.log"
if [ -f "$SCR/32to16_new.pt" ]; then
  cp "$SCR/32to16_new.pt" "$L/"
  for b in 4 8; do
    timeout 60 python3 lattice_generator.py --expc 32to16 --eval "$SCR/32to16_new.pt" --bases "$b" \
      --device cuda >> "$L/new_eval.log" 2>&1
  done
fi
cp bench/lattice.csv lattice/parts/*.json "$L/" 2>/dev/null
{ cat "$L/imports.log"; tail -25 "$L/bench.log"; grep mse "$L/bases.log" "$L/train.log" "$L/new_eval.log" 2>/dev/null; } \
  | tee "$OUT/summary.txt"
tar czf "$OUT/a.tar.gz" -C "$OUT" logs && rm -rf "$L"
