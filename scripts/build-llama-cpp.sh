#!/usr/bin/env bash
# Builds llama.cpp's C++ `llama-server` and `llama-bench`, the peer baton's benchmarks compare
# against, from the llama.cpp tree vendored in the llama-cpp-python sdist (PyPI is reachable
# where GitHub is not). Prints the directory holding the two binaries.
#
#   scripts/build-llama-cpp.sh [VERSION]     # default: the newest on PyPI
#
# Cached under ${BATON_CACHE:-~/.cache/baton}/llama.cpp-<version>; about 10 minutes on 2 cores
# the first time. Needs a C++ compiler and cmake (`pip install cmake` brings one). The sdist is
# fetched through PyPI's JSON API rather than `pip download --no-binary :all:`, which would
# also build cmake itself from source to prepare the package's metadata.
set -euo pipefail
version=${1:-}
cache=${BATON_CACHE:-$HOME/.cache/baton}
meta=$(python3 - "$version" <<'PY'
import json, sys, urllib.parse, urllib.request
want = sys.argv[1]
base = "https://pypi.org/pypi/llama-cpp-python/" + (want + "/" if want else "") + "json"
d = json.load(urllib.request.urlopen(base))
url = next(u["url"] for u in d["urls"] if u["packagetype"] == "sdist")
print(d["info"]["version"], urllib.parse.urljoin(base, url))
PY
)
version=${meta%% *}
url=${meta#* }
dir=$cache/llama.cpp-$version
if [[ -x $dir/bin/llama-server && -x $dir/bin/llama-bench ]]; then
  echo "$dir/bin"
  exit 0
fi
command -v cmake >/dev/null || python3 -m pip install -q cmake >&2
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -sfL "$url" -o "$tmp/sdist.tar.gz"
tar -xzf "$tmp/sdist.tar.gz" -C "$tmp"
src=$(echo "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
cmake -S "$src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$tmp/build" --target llama-server llama-bench -j "$(nproc)" >&2
mkdir -p "$dir/bin"
cp "$tmp/build/bin/llama-server" "$tmp/build/bin/llama-bench" "$dir/bin/"
echo "$version" >"$dir/VERSION"
echo "$dir/bin"
