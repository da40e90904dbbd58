#!/usr/bin/env bash
# Train all three backbones on a lent GPU machine; results come back through $OUT.
# Here, once:   mkdir -p .data && cp -r ../shared/data/chest_xray_224/train .data/train
# Device call:  bash train/gpu_run.sh --scale 0.75   (carry: [".data/train"], timeout_s: 600; the
#               scale fits the 15 minutes of device time: train/GPU_ROUND.md, "What fits")
# Next call:    python3 train/gpu_run.py --fetch N --out "$OUT"   (N as the log says)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 train/gpu_run.py --data "${DATA:-.data/train}" --out "${OUT:-runs/gpu_out}" "$@"
