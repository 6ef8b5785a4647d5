#!/usr/bin/env bash
# Bits-vs-quality sweep on the GPU machine (issue 4) for one model, in parallel jobs on one GPU
# (a 135M-0.5B model leaves an H100 mostly idle; each job is a scripts/pareto.py process):
#   PART=lq    LiftQuant 16to8, 24to10, 20to8, 24to8 (one job each; checkpoints kept for e2e)
#   PART=base  FP + RTN 2/3/4 (one job) and GPTQ 2/3/4 (one job), group 128
#   PART=all   both at once
# RTN_BITS / GPTQ_BITS (default 2,3,4) and SKIP_FP=1 narrow the baseline jobs, CONFIGS the
# LiftQuant ones, e.g. to fill in rows a cut-short call left missing.
# A job whose CSV already exists is skipped, and LiftQuant jobs run with --resume, so the same
# command issued again after a call ran out of time finishes only what is missing.
# Rows land in $SCR/quality/<label>-<job>.csv; all of them are merged into $OUT/quality.csv and
# $OUT/quality.png. Assets must already be in $SCR/home (scripts/gpu_stage_b.sh stages them).
#   SCR=/tmp/lq_scratch OUT=... MODEL=demo LABEL=smollm2-135m PART=lq bash scripts/gpu_quality.sh
set -u
OUT=${OUT:-/tmp/lq_out}; SCR=${SCR:-/tmp/lq_scratch}; mkdir -p "$OUT/logs" "$SCR/quality"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LIFTQUANT_HOME=$SCR/home
MODEL=${MODEL:-demo}; LABEL=${LABEL:-smollm2-135m}; PART=${PART:-lq}
COMMON=(--model "$MODEL" --model_name "$LABEL" --nsamples "${NSAMPLES:-128}"
        --seqlen "${SEQLEN:-1024}" --epochs "${EPOCHS:-2}" --batch_size "${BATCH:-4}"
        --group_size 128 --tasks "${TASKS:-pack}" --tasks_limit "${TASKS_LIMIT:-300}"
        --save_dir "$SCR/pareto" --keep_checkpoints --budget_gb "${BUDGET:-0.1}" ${EXTRA:-})
job() {  # name, extra pareto.py args
  local name=$1; shift
  [ -s "$SCR/quality/$LABEL-$name.csv" ] && { echo "$LABEL $name done before" >> "$OUT/logs/status.txt"; return; }
  OMP_NUM_THREADS=3 timeout "${JOB_S:-540}" python3 scripts/pareto.py "${COMMON[@]}" \
    --csv "$SCR/quality/$LABEL-$name.csv" --plot "$SCR/quality/$LABEL-$name.png" "$@" \
    > "$OUT/logs/$LABEL-$name.log" 2>&1
  echo "$LABEL $name rc=$? $(date +%T)" >> "$OUT/logs/status.txt"
}
echo "start $(date +%T)" >> "$OUT/logs/status.txt"
if [ "$PART" != base ]; then
  for c in ${CONFIGS:-16to8 24to10 20to8 24to8}; do job "$c" --skip_fp --resume --configs "$c" & done
fi
if [ "$PART" != lq ]; then
  RTN_BITS=${RTN_BITS:-2,3,4}; GPTQ_BITS=${GPTQ_BITS:-2,3,4}
  if [ "${SKIP_FP:-0}" = 1 ]; then
    job "rtn${RTN_BITS//,/}" --skip_fp --baselines "rtn:$RTN_BITS" &
  else
    job fp-rtn --baselines "rtn:$RTN_BITS" &
  fi
  job "gptq${GPTQ_BITS//,/}" --skip_fp --baselines "gptq:$GPTQ_BITS" &
fi
wait
python3 -m liftquant.pareto merge "$SCR"/quality/*.csv --out "$OUT/quality.csv" \
  --plot "$OUT/quality.png" > "$OUT/logs/merge.log" 2>&1
cat "$OUT/logs/status.txt"; column -s, -t < "$OUT/quality.csv" 2>/dev/null | cut -c1-150
