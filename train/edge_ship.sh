#!/usr/bin/env bash
# After the edge round (train/EDGE_ROUND.md): export the winner to INT8 with everything the other
# shipped files carry, put it in the repository and measure it beside them. The default rule chose
# it (validation AUC tied with ResNet50's within 1e-4, and the fastest), so it ships as the
# embedded default, and ResNet50 INT8 moves to models/resnet50_int8.onnx. Every
# heavy step runs under the shared lock; the reports record their own commands.
#   bash train/edge_ship.sh /tmp/cxr-edge/WINNER            # export, reports, ARM64 check, cards
#   STEPS="reports cards" bash train/edge_ship.sh RUN        # only some of: export reports arm64 cards
# The test split is read here for the first time by anything of the round: once, by the
# accuracy report on the shipped bytes (and by the reports that read the same file after it).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:?usage: edge_ship.sh RUN_FOLDER, the pick of python3 train/edge_round.py select}"
STEPS="${STEPS:-export reports arm64 cards}"
LOCK=/tmp/cxr-heavy.lock
DATA=../shared/data/chest_xray_224
EXPORTS="${EXPORTS:-/tmp/cxr-edge/ship}"
EDGE=runtime/cxr_infer/models/default.onnx
RESNET=models/resnet50_int8.onnx
shipped() { python3 -c 'import json; print("\n".join(m["path"] for m in json.load(open("models/shipped.json"))["models"]))'; }
R=benchmarks/results
heavy() { echo "+ $*" >&2; flock "$LOCK" "$@"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }

if has export; then
  mkdir -p "$EXPORTS"
  python3 train/edge_round.py select --root "$(dirname "$RUN")" --report $R/edge-round.md
  # threshold 0.5 as the other shipped files; domain check, heatmap, temperature, operating
  # points and intended use (children 1-5, frontal CR/DX/DR) are cxr-export's defaults
  heavy cxr-export "$RUN" --out "$EXPORTS/mobilenet_v3.onnx" --int8 --calibration "$DATA/train" \
    --threshold 0.5 --threads 2
  cp "$EXPORTS/mobilenet_v3_int8.onnx" "$EDGE"
  cxr-infer --model "$EDGE" --info
fi

mapfile -t MODELS < <(shipped)
if has reports; then
  heavy cxr-bench accuracy --model "${MODELS[@]}" --data "$DATA/test" --out $R --name shipped --threads 2 -q
  heavy cxr-bench accuracy --model "${MODELS[@]}" --validation "$DATA/train" --name validation --out $R \
    --threads 2 -q
  heavy cxr-bench latency --model "${MODELS[@]}" --batch 1 --threads 2 --repeats 4 --iterations 30 \
    --domain-check both --heatmap both --name checks-b1 --out $R -q
  # the goal's ratio: the edge file against ResNet50 INT8, on both engines, in one run
  # (as Classifier runs them: the image check on; the map asked for or not)
  heavy cxr-bench latency --model "$RESNET" "$EDGE" --device cpu,openvino \
    --batch 1 --threads 2 --repeats 6 --iterations 30 --domain-check on --heatmap both --name edge --out $R -q
  heavy cxr-bench formats --model "${MODELS[@]}" --data "$DATA/test" --providers cpu,openvino --threads 2 \
    --domain-data ../shared/data/foreign_cxr ../shared/data/kermany_fullres --out $R --name cpu-openvino -q
  heavy cxr-bench heatmaps --model "${MODELS[@]}" --data "$DATA/test" --per-kind 4 --threads 2 --out $R -q
  heavy cxr-bench domain --model "${MODELS[@]}" --data "$DATA/test" --foreign ../shared/data/foreign_cxr \
    --originals ../shared/data/kermany_fullres --validation "$DATA/train" --count 100 --threads 2 --out $R -q
fi

if has arm64; then  # installs the committed tree: commit the model file first
  git ls-files --error-unmatch "$EDGE" >/dev/null
  heavy python3 scripts/arm64_check.py --count 50 --only-changed
fi

if has cards; then
  cxr-bench card "${MODELS[@]}"
  cxr-bench summary --results $R --out $R -q
fi
