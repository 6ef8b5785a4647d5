#!/bin/bash
cd <bisect clone>
. <dev venv>/bin/activate
rm -rf out/demo
c=$(git rev-parse --short HEAD)
HF_HUB_OFFLINE=1 timeout 1500 python main.py > <log dir>/bisect_$c.log 2>&1
if [ ! -f out/demo/model.safetensors ]; then echo "$c skip (no checkpoint)" >> <log dir>/bisect.txt; exit 125; fi
h=$(sha256sum out/demo/model.safetensors | cut -c1-16)
p=$(grep -ho "perplexity [0-9.]* over" <log dir>/bisect_$c.log | tail -1)
same=$(python -c "
from safetensors import safe_open
import torch
a=safe_open('<cad284b demo out>/model.safetensors','pt'); b=safe_open('out/demo/model.safetensors','pt')
print(int(set(a.keys())==set(b.keys()) and all(torch.equal(a.get_tensor(k),b.get_tensor(k)) for k in a.keys())))")
echo "$c $h $p tensors_equal_cad=$same" >> <log dir>/bisect.txt
[ "$same" = "1" ] && exit 0
exit 1
