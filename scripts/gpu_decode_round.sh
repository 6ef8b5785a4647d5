#!/usr/bin/env bash
# One device call: CUDA kernel tests, the decode-step profile and the 8B-shape decode rows.
# Run from an unpacked snapshot; results land in $OUT/round.tar.gz. Rows record the source hash
# (no .git there): `python -m liftquant.provenance match HASH` names its commit here.
#   STEPS="tests profile variants decode kernels sweep" (default: tests profile decode)
set -u
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
R=$OUT/round; mkdir -p "$R"
STEPS=${STEPS:-"tests profile decode"}
for s in $STEPS; do
  case $s in
    sweep) timeout ${SWEEP_TIMEOUT:-240} python3 scripts/sweep_transform.py --json "$R/transform_sweep.json" > "$R/sweep.log" 2>&1; grep -A20 "^best per" "$R/sweep.log"; grep floor "$R/sweep.log" ;;
    tests) timeout ${TESTS_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/test_groups.py tests/test_fused_small.py \
             tests/test_kernels.py tests/test_pdl.py tests/test_prologue.py ${TEST_FILTER:--k "cuda or reference or registry or backend or group or fits or switch"} \
             > "$R/tests.log" 2>&1; tail -3 "$R/tests.log" ;;
    profile) timeout 240 python3 scripts/profile_decode.py ${PROFILE_ARGS:-} \
             --json "$R/profile.json" > "$R/profile.log" 2>&1; grep -A8 "^shape config" "$R/profile.log" ;;
    variants) timeout ${VARIANTS_TIMEOUT:-300} python3 scripts/bench_variants.py ${VARIANT_ARGS:-} \
             --json "$R/variants.json" > "$R/variants.log" 2>&1; tail -12 "$R/variants.log" ;;
    decode) timeout 300 python3 scripts/bench_decode.py --out "$R/decode.csv" \
             > "$R/decode.log" 2>&1; cat "$R/decode.log" | grep tok/s ;;
    kernels) timeout ${KERNELS_TIMEOUT:-400} python3 scripts/bench_kernels.py --out "$R/kernels.csv" \
             --sweep-json "$R/gemv_sweep.json" ${KERNEL_ARGS:-} > "$R/kernels.log" 2>&1; tail -30 "$R/kernels.log" ;;
  esac
done
tar czf "$OUT/round.tar.gz" -C "$OUT" round
