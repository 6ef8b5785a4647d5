#!/usr/bin/env bash
# Bits-vs-quality sweep of one model (bench/quality/README.md, SPEC §8): the FP model, LiftQuant at
# each lattice of CONFIGS, and the RTN / GPTQ baselines at RTN_BITS / GPTQ_BITS, all on the same
# calibration and evaluation data; rows go to $OUT/<label>-<job>.csv and are merged into
# $OUT/quality.csv and $OUT/quality.png. Runs on any machine that has the model locally (or the
# hub); one scripts/pareto.py process per job, PARALLEL=1 runs them side by side (a model of
# 135M-0.5B leaves a large GPU mostly idle). A job whose CSV exists is skipped and LiftQuant jobs
# run with --resume, so issuing the same command again finishes only what is missing.
#   bash scripts/quality_sweep.sh                                    # SmolLM2-135M demo model
#   MODEL=/models/qwen2.5-coder-0.5b LABEL=qwen2.5-coder-0.5b NSAMPLES=64 BUDGET=0.3 \
#     bash scripts/quality_sweep.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/quality}; mkdir -p "$OUT/logs"
MODEL=${MODEL:-demo}; LABEL=${LABEL:-smollm2-135m}
CONFIGS=${CONFIGS:-16to8 24to10 20to8 24to8}; RTN_BITS=${RTN_BITS:-2,3,4}
GPTQ_BITS=${GPTQ_BITS:-2,3,4}
COMMON=(--model "$MODEL" --model_name "$LABEL" --nsamples "${NSAMPLES:-128}"
        --seqlen "${SEQLEN:-1024}" --epochs "${EPOCHS:-2}" --batch_size "${BATCH:-4}"
        --group_size 128 --tasks "${TASKS:-pack}" --tasks_limit "${TASKS_LIMIT:-300}"
        --save_dir "$OUT/checkpoints" --keep_checkpoints --budget_gb "${BUDGET:-0.1}")
job() {  # name, then the job's own pareto.py flags
  local name=$1; shift
  [ -s "$OUT/$LABEL-$name.csv" ] && { echo "$LABEL $name: done before"; return; }
  python scripts/pareto.py "${COMMON[@]}" --csv "$OUT/$LABEL-$name.csv" \
    --plot "$OUT/$LABEL-$name.png" "$@" > "$OUT/logs/$LABEL-$name.log" 2>&1
  echo "$LABEL $name: rc=$?"
}
run() { if [ "${PARALLEL:-0}" = 1 ]; then job "$@" & else job "$@"; fi; }
[ "${SKIP_FP:-0}" = 1 ] || run fp --configs "" --baselines
for c in $CONFIGS; do run "$c" --skip_fp --resume --configs "$c"; done
[ -z "$RTN_BITS" ] || run "rtn${RTN_BITS//,/}" --skip_fp --baselines "rtn:$RTN_BITS"
[ -z "$GPTQ_BITS" ] || run "gptq${GPTQ_BITS//,/}" --skip_fp --baselines "gptq:$GPTQ_BITS"
wait
python -m liftquant.evaluation.pareto merge "$OUT"/*-*.csv --out "$OUT/quality.csv" --plot "$OUT/quality.png"
