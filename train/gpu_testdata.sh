#!/usr/bin/env bash
# The test data a GPU machine needs, in an ignored folder to carry (it cannot see ../shared):
# the 624-image test split (5 MB) and the first train images the tests use, as tests/conftest.py
# expects them under CXR_TEST_DATA.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
src=../shared/data/chest_xray_224
dst=.data/testdata/chest_xray_224
rm -rf .data/testdata && mkdir -p "$dst/train/NORMAL" "$dst/train/PNEUMONIA"
cp -r "$src/test" "$dst/test"
for label in NORMAL PNEUMONIA; do
  mapfile -t names < <(LC_ALL=C ls "$src/train/$label")
  for f in "${names[@]:0:40}"; do cp "$src/train/$label/$f" "$dst/train/$label/"; done
done
exclude="$(git rev-parse --git-dir)/info/exclude"
grep -qxF "/.data/" .gitignore "$exclude" 2>/dev/null || echo "/.data/" >> "$exclude"
du -sh .data/testdata
