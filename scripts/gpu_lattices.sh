#!/usr/bin/env bash
# Train every shipped lattice in parallel on one GPU, then benchmark the search.
# Run on the GPU machine from the repo root; results land in $OUT/lattices.tar.gz.
#   STEPS=3000 RESTARTS=4 TIME_LIMIT=240 bash scripts/gpu_lattices.sh
set -u
OUT=${OUT:-/tmp/liftquant_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-3000}; RESTARTS=${RESTARTS:-4}; TIME_LIMIT=${TIME_LIMIT:-170}; HARD_LIMIT=${HARD_LIMIT:-330}
TAU_FINAL=${TAU_FINAL:-10,60}
SPECS=${SPECS:-"32to20 16to10 16to8 32to16 30to14 18to8 20to8 20to10 22to8 24to10 25to10 24to8"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
mkdir -p lattice/parts
for spec in $SPECS; do
  timeout 420 python lattice_generator.py --expc "$spec" --steps "$STEPS" --restarts "$RESTARTS" \
    --time_limit "$TIME_LIMIT" --hard_time_limit "$HARD_LIMIT" --tau 10 --tau_final "$TAU_FINAL" --budget 67108864 --device cuda \
    --no_progress --index "lattice/parts/$spec.json" > "$OUT/gen_$spec.log" 2>&1 &
done
wait
python scripts/merge_lattice_index.py lattice/parts lattice/index.json
timeout 140 python scripts/bench_lattice.py --output bench/lattice.csv 2>&1 | tee "$OUT/bench.log"
cat "$OUT"/gen_*.log | grep -E "mse|Error|error" | tail -40
tar czf "$OUT/lattices.tar.gz" lattice bench/lattice.csv
