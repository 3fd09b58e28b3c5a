#!/usr/bin/env bash
# Builds llama.cpp's C++ `llama-server` and `llama-bench`, the peer baton's benchmarks compare
# against, from the llama.cpp tree vendored in the llama-cpp-python sdist (PyPI is reachable
# where GitHub is not). Prints the directory holding the two binaries.
#
#   scripts/build-llama-cpp.sh [VERSION]     # default: the newest on PyPI
#
# Cached under ${BATON_CACHE:-~/.cache/baton}/llama.cpp-<version>; about 10 minutes on 2 cores
# the first time. Needs a C++ compiler; cmake and scikit-build-core come from PyPI as wheels.
# The sdist is fetched with `pip download --no-build-isolation` (only the package registry is
# reachable here, not PyPI's JSON API; with build isolation pip would build cmake itself from
# source just to read the package's metadata).
set -euo pipefail
version=${1:-}
cache=${BATON_CACHE:-$HOME/.cache/baton}
if [[ -n $version ]]; then
  dir=$cache/llama.cpp-$version
  if [[ -x $dir/bin/llama-server && -x $dir/bin/llama-bench ]]; then
    echo "$dir/bin"
    exit 0
  fi
fi
python3 -m pip install -q cmake scikit-build-core >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-binary :all: --no-deps --no-build-isolation \
  "llama-cpp-python${version:+==$version}" -d "$tmp" >&2
sdist=$(echo "$tmp"/llama_cpp_python-*.tar.gz)
version=${sdist##*/llama_cpp_python-}
version=${version%.tar.gz}
dir=$cache/llama.cpp-$version
if [[ -x $dir/bin/llama-server && -x $dir/bin/llama-bench ]]; then
  echo "$dir/bin"
  exit 0
fi
mkdir -p "$dir"
tar -xzf "$sdist" -C "$tmp"
src=$(echo "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
cmake -S "$src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$tmp/build" --target llama-server llama-bench -j "$(nproc)" >&2
mkdir -p "$dir/bin"
cp "$tmp/build/bin/llama-server" "$tmp/build/bin/llama-bench" "$dir/bin/"
echo "$version" >"$dir/VERSION"
echo "$dir/bin"
