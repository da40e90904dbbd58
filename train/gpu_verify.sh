#!/usr/bin/env bash
# The GPU round's checks on a lent machine (train/GPU_ROUND.md, call 6): onnxruntime-gpu from the
# parts carried before, the GPU tests (tests/test_gpu.py and the runtime's own), exports of the
# round's runs where call 5 left them in /tmp/cxr_runs, and `cxr-bench formats` on every file
# with CPU, CUDA and TensorRT rows. Reports and the log come back through $OUT.
#   device call: VERIFY_S=240 bash train/gpu_verify.sh   (carry: [".data/testdata"], timeout_s: 420)
#   EXPORT=0 skips the exports (the shipped default model alone).
#   VERIFY_S=S (default 240): no formats row starts after S seconds from this script's start (the
#   rows left say so); formats.json/.md in $OUT are rewritten after every row, so a call stopped
#   at its timeout_s still brings back the rows measured.
#   ResNet50 goes first everywhere (its FP16 row holds the issue's throughput goal).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-runs/gpu_verify}"
VERIFY_S="${VERIFY_S:-240}"
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
  models=()
  if [ "${EXPORT:-1}" = 1 ] && [ -d /tmp/cxr_train_data ]; then
    for b in resnet50 inception_v3 vgg16; do
      [ -f "/tmp/cxr_runs/$b/checkpoint.json" ] || continue
      if [ "$SECONDS" -gt $((VERIFY_S * 6 / 10)) ]; then
        echo "gpu_verify: $b not exported: ${SECONDS}s of VERIFY_S=${VERIFY_S}s gone, the rest is for formats"
        continue
      fi
      timeout 200 python3 -m cxr_export.cli "/tmp/cxr_runs/$b" --out "/tmp/cxr_export/$b.onnx" --int8 --fp16 \
        --calibration /tmp/cxr_train_data --threads 16
      rc=$?  # 3: a precision refused (its file removed), the others written
      [ "$rc" = 0 ] || echo "gpu_verify: export of $b exited $rc"
      for f in "/tmp/cxr_export/$b.onnx" "/tmp/cxr_export/${b}_int8.onnx" "/tmp/cxr_export/${b}_fp16.onnx"; do
        [ "$rc" = 0 ] || [ "$rc" = 3 ] && [ -f "$f" ] && models+=("$f")
      done
      echo "gpu_verify: ${SECONDS}s after the start"
    done
  fi
  # rows go in the order of the files: the first backbone exported (ResNet50 unless it failed), then the
  # shipped default (an INT8 VGG16; the table names its file where it shares a row with a new one)
  n_first=0
  for f in "${models[@]}"; do [[ "$f" == "${models[0]%.onnx}"* ]] && n_first=$((n_first + 1)); done
  models=("${models[@]:0:n_first}" runtime/cxr_infer/models/default.onnx "${models[@]:n_first}")
  left=$((VERIFY_S - SECONDS)); [ "$left" -lt 30 ] && left=30
  echo "gpu_verify: formats on ${#models[@]} files, no row started after ${left}s"
  timeout 400 python3 -m cxr_bench.cli formats --model "${models[@]}" --data .data/testdata/chest_xray_224/test \
    --providers cpu,cuda,tensorrt --threads 16 --iterations 50 --time-limit "$left" --out "$OUT"
  date -u
} 2>&1 | tee "$OUT/gpu_verify.log"
