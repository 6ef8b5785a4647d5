#!/usr/bin/env bash
# Call B: reassemble the demo GGUF from the part staged by call A and this call's part 2, check
# its sha256, install the carried wheels, then run scripts/gpu_pipeline.sh.
set -u
SCR=${SCR:-/tmp/lq_scratch}
cat "$SCR/gguf.part00" .assets/p2/gguf.part01 > "$SCR/home/files/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "$(cat .assets/p2/gguf.sha256)  $SCR/home/files/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 3
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$SCR"/*.whl && export PYTHONPATH=/tmp/site
bash scripts/gpu_pipeline.sh
