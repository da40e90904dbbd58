#!/usr/bin/env bash
# onnxruntime-gpu for the lent GPU machine, whose image has only the CPU build: its wheel (256 MB,
# CUDA 13 like the machine's own CUDA libraries) is far over one call's 64 MiB, so it travels in
# parts, one per call, into /tmp of the same warm machine.
#   here:   bash train/ort_gpu.sh prepare          -> .ortgpu/p0 .. pN (xz, < 60 MB each) + SHA256
#   device: bash train/ort_gpu.sh receive K        (carry: [".ortgpu/pK"]) -> /tmp/ortgpu
#   device: eval "$(bash train/ort_gpu.sh install)"  -> /tmp/site on PYTHONPATH, CUDA libraries found
# Call 'train/device_tree.sh hide-all' first here so that each part has a call's room.
set -uo pipefail
VERSION="${ORT_GPU_VERSION:-1.31.1}"
PART_MB="${ORT_GPU_PART_MB:-60}"
cmd="${1:-}"
case "$cmd" in
  prepare)
    set -e
    cd "$(git rev-parse --show-toplevel)"
    exclude="$(git rev-parse --git-dir)/info/exclude"
    mkdir -p "$(dirname "$exclude")" && touch "$exclude"
    grep -qxF "/.ortgpu/" "$exclude" || echo "/.ortgpu/" >> "$exclude"
    rm -rf .ortgpu && mkdir -p .ortgpu/whl .ortgpu/x
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d .ortgpu/whl "onnxruntime-gpu==$VERSION"
    (cd .ortgpu/x && unzip -q ../whl/*.whl)
    tar -C .ortgpu/x -cf - . | xz -T2 -6 > .ortgpu/ort.tar.xz
    rm -rf .ortgpu/x
    sha=$(sha256sum .ortgpu/ort.tar.xz | cut -d' ' -f1)
    split -b "${PART_MB}000000" -d -a 1 .ortgpu/ort.tar.xz .ortgpu/part
    n=0
    for p in .ortgpu/part*; do
      mkdir -p ".ortgpu/p$n" && mv "$p" ".ortgpu/p$n/" && echo "$sha" > ".ortgpu/p$n/SHA256"
      n=$((n + 1))
    done
    rm -f .ortgpu/ort.tar.xz
    echo "ort_gpu: onnxruntime-gpu $VERSION in $n parts (.ortgpu/p0 .. p$((n - 1))), sha256 $sha"
    du -sh .ortgpu/p* ;;
  receive)
    k="${2:?usage: bash train/ort_gpu.sh receive K}"
    mkdir -p /tmp/ortgpu && cp .ortgpu/p"$k"/* /tmp/ortgpu/ && ls -la /tmp/ortgpu ;;
  install)
    # prints the exports to eval; everything else goes to stderr
    if [ ! -d /tmp/site/onnxruntime ]; then
      want=$(cat /tmp/ortgpu/SHA256 2>/dev/null)
      got=$(cat /tmp/ortgpu/part* 2>/dev/null | sha256sum | cut -d' ' -f1)
      if [ -z "$want" ] || [ "$want" != "$got" ]; then
        echo "ort_gpu: the parts in /tmp/ortgpu are incomplete ($(ls /tmp/ortgpu 2>/dev/null | tr '\n' ' ')): sha256 $got, want $want" >&2
        exit 1
      fi
      mkdir -p /tmp/site && cat /tmp/ortgpu/part* | xz -d | tar -x -C /tmp/site || exit 1
    fi
    libs=$(python3 - <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
print(":".join(sorted({os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "nvidia", "**", "lib*.so*"), recursive=True)})))
PY
)
    echo "export PYTHONPATH=/tmp/site\${PYTHONPATH:+:\$PYTHONPATH}"
    echo "export LD_LIBRARY_PATH=${libs}\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
    PYTHONPATH=/tmp/site LD_LIBRARY_PATH="$libs" python3 -c "import onnxruntime as o; print('ort_gpu: onnxruntime', o.__version__, o.get_available_providers())" >&2 ;;
  *) echo "usage: bash train/ort_gpu.sh prepare | receive K | install (source it)" >&2; exit 2 ;;
esac
