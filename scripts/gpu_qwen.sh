#!/usr/bin/env bash
# Qwen2.5-Coder-0.5B sweep on the GPU machine (issue 4). The 491 MB GGUF travels as eight
# parts (.assets/q0 .. q7, one call each, copied to $QW); this call reassembles and checks it,
# installs the carried wheels, stages the wiki-offline text and task-pack sources
# (.assets/r/assets.tar.gz), converts the model once, then runs scripts/gpu_quality.sh with
# PART=all (LiftQuant 16to8/24to10/20to8/24to8, FP, RTN and GPTQ 2/3/4 as parallel jobs).
# Issued again, it resumes what a cut-short call left unfinished.
#   QW=/tmp/qw SCR=/tmp/lq_scratch OUT=... bash scripts/gpu_qwen.sh
set -u
OUT=${OUT:-/tmp/lq_out}; SCR=${SCR:-/tmp/lq_scratch}; QW=${QW:-/tmp/qw}
mkdir -p "$OUT/logs" "$SCR/home/files/qwen2.5-coder-0.5b" "$SCR/whl"
G=$SCR/home/files/qwen2.5-coder-0.5b/Qwen2.5-Coder-0.5B-Instruct.gguf
if [ ! -f "$G" ]; then
  cat "$QW"/qwen.part? > "$G.tmp" && mv "$G.tmp" "$G"
fi
echo "$(cat "$QW/qwen.sha256")  $G" | sha256sum -c - || exit 3
tar xzf .assets/r/assets.tar.gz -C "$SCR/home"
if [ ! -d /tmp/site/lm_eval ]; then
  cp .whl/*.whl "$SCR/whl/" && python3 -m pip install -q --no-index --no-deps --no-compile \
    --target /tmp/site "$SCR"/whl/*.whl > "$OUT/logs/pip.log" 2>&1
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LIFTQUANT_HOME=$SCR/home
python3 -m liftquant.assets fetch qwen2.5-coder-0.5b wiki-offline --convert > "$OUT/logs/assets.log" 2>&1 || exit 4
python3 -m liftquant.tasks fetch > "$OUT/logs/tasks.log" 2>&1 || exit 5
MODEL=$(python3 -m liftquant.assets path qwen2.5-coder-0.5b --hf) LABEL=qwen2.5-coder-0.5b \
  PART=${PART:-all} NSAMPLES=${NSAMPLES:-64} BUDGET=${BUDGET:-0.3} bash scripts/gpu_quality.sh
