#!/usr/bin/env bash
# Quality runs of the demo model on the GPU machine (issue 3, bench/pipeline.md).
# Expects the SmolLM2 GGUF and the wiki-offline JSON staged in $SCR (see README "GPU runs").
#   SCR=/tmp/lq_scratch OUT=... bash scripts/gpu_pipeline.sh
set -u
OUT=${OUT:-/tmp/lq_out}; SCR=${SCR:-/tmp/lq_scratch}; mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LIFTQUANT_HOME=$SCR/home
NSAMPLES=${NSAMPLES:-128}; SEQLEN=${SEQLEN:-2048}; BACKEND=${BACKEND:-torch}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/logs/gpu.txt" 2>&1
run() {  # name, then main.py flags
  local name=$1; shift
  /usr/bin/time -v python main.py --save_dir "$SCR/$name" --backend "$BACKEND" "$@" \
    > "$OUT/logs/$name.log" 2>&1
  echo "$name rc=$?" >> "$OUT/logs/status.txt"
  cp "$SCR/$name/report.json" "$OUT/logs/report_$name.json" 2>/dev/null
}
RUNS=${RUNS:-"demo seed_20to8 seed_24to8"}
want() { case " $RUNS " in *" $1 "*) return 0;; esac; return 1; }
# 1. the demo command exactly as a newcomer runs it (GPU defaults)
want demo && run demo
# 2-3. the seed recipe (authors' README flags), calibration scaled down to NSAMPLES x SEQLEN
SEED="--model demo --eval_ppl --wbits 2 --w_sym --abits 16 --kbits 16 --vbits 16 \
 --true-sequential --act-order --use_fpinps --Rres_init Hadamard --nsamples $NSAMPLES \
 --seqlen $SEQLEN --epochs 2 --batch_size 2 --calib_dataset wiki-offline --usefullfp \
 --training_trans --finetuning_weights --align 1 --lscale_lr 5e-3 --lexw_lr 2e-2 \
 --lw_lr 2e-5 --la_lr 2e-3 --lt_lr 2e-4"
want seed_20to8 && run seed_20to8 $SEED --expc 20to8
want seed_24to8 && run seed_24to8 $SEED --expc 24to8 --wbits 3
cd "$OUT" && tar czf logs.tar.gz logs && rm -rf logs
