#!/usr/bin/env bash
# Call B (issued right after call A, same warm machine): reassemble the demo GGUF from the part
# call A staged and this call's part 2, check its sha256, unpack the wiki-offline text and the
# task-pack sources, convert the model once, build the offline task pack, then run
# scripts/gpu_quality.sh (PART=lq by default).  Carry: .assets/p2 (gguf.part01, gguf.sha256,
# assets.tar.gz with files/wiki-offline and files/tasks).
set -u
OUT=${OUT:-/tmp/lq_out}; SCR=${SCR:-/tmp/lq_scratch}; mkdir -p "$OUT/logs" "$SCR/home/files/smollm2-135m"
G=$SCR/home/files/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$G" ] || cat "$SCR/gguf.part00" .assets/p2/gguf.part01 > "$G"
echo "$(cat .assets/p2/gguf.sha256)  $G" | sha256sum -c - || exit 3
tar xzf .assets/p2/assets.tar.gz -C "$SCR/home"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LIFTQUANT_HOME=$SCR/home
python3 -m liftquant.assets fetch smollm2-135m wiki-offline --convert > "$OUT/logs/assets.log" 2>&1 || exit 4
python3 -m liftquant.tasks fetch > "$OUT/logs/tasks.log" 2>&1 || exit 5
bash scripts/gpu_quality.sh
