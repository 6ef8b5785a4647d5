#!/usr/bin/env bash
# Lloyd polish of shipped pinv lattices on the GPU (issue 2): for each spec, ITERS rounds of
# "codes by the quantizer's own search on N fresh Gaussian vectors, then the least-squares M",
# scored on 100k held-out vectors. Results (matrix + one-row index each) land in $OUT/lloyd/;
# nothing under lattice/ is touched. Specs run as parallel processes on the one GPU.
#   OUT=... SPECS="32to16 30to14" ITERS=8 N=2000000 bash scripts/gpu_lloyd.sh
set -u
OUT=${OUT:-/tmp/lq_out}; D=$OUT/lloyd; mkdir -p "$D"
export PYTHONUNBUFFERED=1
for spec in ${SPECS:-32to16 30to14 24to10 20to8 24to8}; do
  timeout "${LLOYD_S:-420}" python3 lattice_generator.py --expc "$spec" --init "lattice/$spec.pt" \
    --steps 0 --lloyd "${ITERS:-8}" --lloyd_n "${N:-2000000}" --device cuda --no_progress \
    --output "$D/$spec.pt" --index "$D/$spec.json" > "$D/$spec.log" 2>&1 &
done
wait
grep -h "mse" "$D"/*.log | grep -v INFO
