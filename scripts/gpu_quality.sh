#!/usr/bin/env bash
# Bits-vs-quality sweep on the GPU machine (issue 4): bench/quality.csv + bench/quality.png.
# FP, LiftQuant 16to8/24to10/20to8/24to8, RTN and GPTQ (group 128) at 2/3/4 bits, for
# SmolLM2-135M and Qwen2.5-Coder-0.5B; perplexity on wiki-offline and the offline task pack.
#   SCR=/tmp/lq_scratch OUT=/tmp/lq_out bash scripts/gpu_quality.sh
# Needs lm-eval (pip install -r requirements-eval.txt); TASKS_LIMIT=N caps examples per task.
set -u
OUT=${OUT:-/tmp/lq_out}; SCR=${SCR:-/tmp/lq_scratch}; mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LIFTQUANT_HOME=$SCR/home
NSAMPLES=${NSAMPLES:-128}; SEQLEN=${SEQLEN:-2048}; EPOCHS=${EPOCHS:-2}; TASKS=${TASKS:-pack}
LIMIT=${TASKS_LIMIT:+--tasks_limit $TASKS_LIMIT}
python -m liftquant.tasks fetch > "$OUT/logs/tasks.log" 2>&1
python -m liftquant.assets fetch qwen2.5-coder-0.5b --convert >> "$OUT/logs/tasks.log" 2>&1
QWEN=$(python -m liftquant.assets path qwen2.5-coder-0.5b --hf)
sweep() {  # label, model, budget GB
  python scripts/pareto.py --model "$2" --model_name "$1" --configs 16to8,24to10,20to8,24to8 \
    --baselines rtn:2,3,4 gptq:2,3,4 --group_size 128 --nsamples "$NSAMPLES" --seqlen "$SEQLEN" \
    --epochs "$EPOCHS" --batch_size 4 --tasks "$TASKS" $LIMIT --save_dir "$SCR/pareto" \
    --csv "$OUT/quality.csv" --plot "$OUT/quality.png" --budget_gb "$3" \
    > "$OUT/logs/pareto_$1.log" 2>&1
  echo "$1 rc=$?" >> "$OUT/logs/status.txt"
}
sweep smollm2-135m demo 0.1
sweep qwen2.5-coder-0.5b "$QWEN" 0.35
cd "$OUT" && tar czf logs.tar.gz logs && rm -rf logs
