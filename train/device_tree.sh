#!/usr/bin/env bash
# Keep the device tool's working tree under its 64 MiB: the two shipped INT8 files under models/
# (45 MB) become untracked and ignored while device calls run, and come back afterwards.
#   bash train/device_tree.sh hide       before the first device call
#   bash train/device_tree.sh hide-all   the embedded default model too (calls that need no model)
#   bash train/device_tree.sh restore    after the last one, and before any commit
#   bash train/device_tree.sh status     what travels now (MB)
# The files never leave the disk: only git's index and .git/info/exclude change. The embedded
# default model (runtime/cxr_infer/models/default.onnx, 28 MB) stays: the GPU tests use it.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
files=(models/vgg16_int8.onnx models/inception_v3_int8.onnx runtime/cxr_infer/models/default.onnx)
exclude="$(git rev-parse --git-dir)/info/exclude"
note="# cxr: hidden from device calls by train/device_tree.sh (restore before committing)"
mark="/models/*_int8.onnx"
mark_all="/runtime/cxr_infer/models/default.onnx"
mkdir -p "$(dirname "$exclude")"
touch "$exclude"
case "${1:-status}" in
  hide|hide-all)
    git reset -q -- "${files[@]}" 2>/dev/null || true
    grep -vxF -e "$mark" -e "$note" -e "$mark_all" "$exclude" > "$exclude.tmp" || true
    mv "$exclude.tmp" "$exclude"
    git rm -q --cached --ignore-unmatch -- "${files[@]:0:2}"
    printf '%s\n%s\n' "$note" "$mark" >> "$exclude"
    if [ "$1" = hide-all ]; then
      git rm -q --cached --ignore-unmatch -- "${files[2]}"
      echo "$mark_all" >> "$exclude"
    fi ;;
  restore)
    git reset -q -- "${files[@]}" 2>/dev/null || true
    grep -vxF -e "$mark" -e "$note" -e "$mark_all" "$exclude" > "$exclude.tmp" || true
    mv "$exclude.tmp" "$exclude" ;;
  status) ;;
  *) echo "usage: bash train/device_tree.sh hide|restore|status" >&2; exit 2 ;;
esac
bytes=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r du -cb 2>/dev/null | awk '/\ttotal$/ {s += $1} END {print s + 0}')
echo "device_tree: ${1:-status}: $((bytes / 1000000)) MB would travel (limit 67 MB = 64 MiB, carried folders included)"
git status --short -- "${files[@]}"
