#!/usr/bin/env bash
# End-to-end fine-tuning before/after on the demo model (issue 6, SPEC §5), GPU machine:
# quantize SmolLM2-135M at 16to8 and 20to8, then e2efinetune.py with the seed README's
# settings (lr 2e-5, factor_a 100, factor_t 10, clip 0.3, bf16); perplexity and the offline
# task pack before and after land in $OUT/e2e_report_<spec>.json. A checkpoint already at
# $SCR/pareto/smollm2-135m-<spec> (a checkpoint that scripts/quality_sweep.sh keeps under
# $OUT/checkpoints) is used as it is; that is how bench/e2e/README.md was produced.
#   SCR=/tmp/lq_scratch OUT=/tmp/lq_out bash scripts/e2e_demo.sh
set -u
OUT=${OUT:-/tmp/lq_out}; SCR=${SCR:-/tmp/lq_scratch}; mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LIFTQUANT_HOME=$SCR/home
SAMPLES=${SAMPLES:-512}; CTX=${CTX:-2048}; TASKS=${TASKS:-pack}
LIMIT="--eval_tasks_limit ${TASKS_LIMIT:-300}"
python -m liftquant.evaluation.tasks fetch > "$OUT/logs/tasks.log" 2>&1
for spec in 16to8 20to8; do
  Q=$SCR/pareto/smollm2-135m-$spec
  if [ ! -f "$Q/config.json" ]; then
    Q=$SCR/q_$spec
    python main.py --model demo --expc "$spec" --save_dir "$Q" > "$OUT/logs/quantize_$spec.log" 2>&1
  fi
  python e2efinetune.py --quant_model_path "$Q" --output_dir "$SCR/e2e_$spec" \
    --expc "$spec" --do_train --dataset wiki-offline --dataset_format pt --pt_context_len "$CTX" \
    --max_train_samples "$SAMPLES" --num_train_epochs 1 --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 16 --learning_rate 2e-5 --factor_a 100 --factor_t 10 \
    --max_grad_norm 0.3 --bf16 --logging_steps 4 --do_ppl_eval --eval_tasks "$TASKS" $LIMIT \
    --per_device_eval_batch_size 8 > "$OUT/logs/e2e_$spec.log" 2>&1
  echo "$spec rc=$?" >> "$OUT/logs/status.txt"
  cp "$SCR/e2e_$spec/e2e_report.json" "$OUT/e2e_report_$spec.json"  # the checkpoint stays in $SCR
done
