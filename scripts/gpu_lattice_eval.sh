#!/usr/bin/env bash
# Re-measure every shipped lattice with the quantizer's current search and benchmark it.
set -u
OUT=${OUT:-/tmp/lq_out}; mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1
for f in lattice/*to*.pt; do
  python lattice_generator.py --eval "$f" --register --n_eval 100000 --device cuda
done 2>&1 | grep -v Warning | tee "$OUT/logs/eval.log"
timeout 200 python scripts/bench_lattice.py --output bench/lattice.csv 2>&1 | tee "$OUT/logs/bench.log"
python scripts/lattice_table.py > /dev/null
tar czf "$OUT/lattice_eval.tar.gz" lattice/index.json lattice/README.md bench/lattice.csv -C "$OUT" logs
