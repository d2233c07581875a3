#!/usr/bin/env bash
# The GPU checks of the open issues, as one prepared run for a lent device machine (about 10 minutes on an H100).
#
# The device image has torch, transformers, peft, accelerate and pytest but none of our web stack, so this runs
# the parts that need a GPU straight from the checkout (PYTHONPATH=.) with that image's python3:
#   1. tests/serve/test_gpu.py  - hosting on one GPU, sharded (device map), a share of one GPU   (#5 point 1)
#   2. bench/serve.py --gpu     - ms per new token: generate, static cache + compile, our engine (#5 point 6)
#   3. bench/finetune.py --gpu  - our trainer against a plain transformers + peft loop            (#4)
#   4. the default-model recipe on CUDA for a few minutes, to see its speed there                 (#6 point 1)
#   5. scripts/gpu_finetune_smoke.py - `refact-lab finetune --processes auto`: one process per GPU (#18)
# Logs go to $OUT (the device tool brings them back) or ./gpu-checks. Each step has its own time limit, so one
# that hangs cannot eat the others' time.
#
#   device run: PYTHONUNBUFFERED=1 bash scripts/gpu_checks.sh        (timeout_s 600)
#   dry run here, on the CPU: GPU_CHECKS_DRY=1 PYTHON=.venv/bin/python bash scripts/gpu_checks.sh
set -u
PY=${PYTHON:-python3}
LOGS=${OUT:-gpu-checks}
mkdir -p "$LOGS"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
DRY=${GPU_CHECKS_DRY:-}

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "--- $name: exit $rc after $((SECONDS - t0))s"
  tail -n 12 "$LOGS/$name.log"
}

$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', '| transformers', transformers.__version__, \
'| peft', peft.__version__)" | tee "$LOGS/versions.log"

if [ -n "$DRY" ]; then
  step serve_bench 300 $PY bench/serve.py --gpu --dry-run
  step recipe 300 $PY scripts/train_default_model.py --out /tmp/gpu-checks-recipe --minutes 1 --max-steps 3 \
    --tokenizer-chars 2000000 --max-stdlib-chars 3000000 --max-chars-per-package 200000
  step finetune_multi 120 $PY scripts/gpu_finetune_smoke.py --cpu --steps 4
  exit 0
fi

step gpu_tests 150 $PY -m pytest -q -p no:cacheprovider tests/serve/test_gpu.py tests/serve/test_fleet_gpu.py tests/serve/test_memory_plan.py
step serve_bench 200 $PY bench/serve.py --gpu
step finetune_bench 150 $PY bench/finetune.py --gpu --rounds 1
step recipe 100 $PY scripts/train_default_model.py --out /tmp/gpu-checks-recipe --device cuda --minutes 1.2 \
  --tokenizer-chars 5000000
# every visible GPU, one training process each (multi-GPU when the machine has 2+; with one, a single process)
step finetune_multi 120 $PY scripts/gpu_finetune_smoke.py --steps 20
