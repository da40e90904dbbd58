#!/usr/bin/env bash
# Issue #16's GPU checks on a lent machine (train/GPU_ROUND.md, call 7): onnxruntime-gpu from the
# parts carried before, the GPU tests (tests/test_gpu.py and the runtime's own), exports of the
# round's runs where call 6 left them in /tmp/cxr_runs, and `cxr-bench formats` on every file
# with CPU, CUDA and TensorRT rows. Reports and the log come back through $OUT.
#   device call: bash train/gpu_verify.sh      (carry: [".data/testdata"], timeout_s: 540)
#   EXPORT=0 skips the exports (the shipped default model alone).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-runs/gpu_verify}"
mkdir -p "$OUT"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  exports=$(bash train/ort_gpu.sh install) \
    || echo "gpu_verify: onnxruntime-gpu did not install cleanly (above): the GPU rows and tests will say so"
  eval "$exports"
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/runtime:$PWD/train:$PWD/export:$PWD/benchmarks"
  export CXR_TEST_DATA="$PWD/.data/testdata" CXR_TRT_CACHE=/tmp/cxr_trt
  python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
  timeout 180 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_formats.py \
    tests/test_classifier.py tests/test_model_layer.py tests/test_cli.py
  models=(runtime/cxr_infer/models/default.onnx)
  if [ "${EXPORT:-1}" = 1 ] && [ -d /tmp/cxr_train_data ]; then
    for b in resnet50 inception_v3 vgg16; do
      [ -f "/tmp/cxr_runs/$b/checkpoint.json" ] || continue
      if timeout 200 python3 -m cxr_export.cli "/tmp/cxr_runs/$b" --out "/tmp/cxr_export/$b.onnx" --int8 --fp16 \
           --calibration /tmp/cxr_train_data --threads 16; then
        models+=("/tmp/cxr_export/$b.onnx" "/tmp/cxr_export/${b}_int8.onnx" "/tmp/cxr_export/${b}_fp16.onnx")
      else
        echo "gpu_verify: export of $b failed"
      fi
    done
  fi
  timeout 240 python3 -m cxr_bench.cli formats --model "${models[@]}" --data .data/testdata/chest_xray_224/test \
    --providers cpu,cuda,tensorrt --threads 16 --iterations 50 --out "$OUT"
  date -u
} 2>&1 | tee "$OUT/gpu_verify.log"
