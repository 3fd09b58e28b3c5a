#!/usr/bin/env bash
# Builds baton with the `cuda` feature on a machine with no CUDA toolkit and no GPU, from
# NVIDIA's PyPI wheels (docs/cuda.md), and copies the stripped binary to OUT (default .gpu/baton),
# with an xz-compressed copy beside it: at about 70 MB the binary alone is over what one call of
# the GPU machine can carry (64 MiB), compressed it is about 11 MB.
#
#   scripts/build-cuda.sh [CUDA_VERSION] [OUT]
#
# CUDA_VERSION (default 13.0) must not be newer than the driver of the GPU machine the binary is
# for: candle loads its kernels as PTX, which a driver older than the toolkit rejects. The wheels
# go to ~/.cache/baton/cuda-VERSION (BATON_CUDA_DIR overrides) and are fetched once. The build
# has its own target directory (target/cuda-VERSION), so it never invalidates the CPU build.
#
# Linking needs the driver's libcuda.so, which no wheel ships: a stub with the same function
# names (taken from cudarc's bindings) stands in, and the real driver's library is loaded at run
# time. At run time the binary needs libcudart.so.13, libcublas.so.13 and libcurand.so.10 from
# the GPU machine's CUDA installation (LD_LIBRARY_PATH).
set -euo pipefail

ver=${1:-13.0}
root=$(cd "$(dirname "$0")/.." && pwd)
out=${2:-$root/.gpu/baton}
tk=${BATON_CUDA_DIR:-$HOME/.cache/baton/cuda-$ver}
home=$tk/nvidia/cu13

if [ ! -x "$home/bin/nvcc" ]; then
  echo "fetching the CUDA $ver toolkit wheels into $tk" >&2
  python3 -m pip install -q --no-deps --target "$tk" \
    "nvidia-cuda-nvcc==$ver.*" "nvidia-cuda-runtime==$ver.*" "nvidia-cuda-cccl==$ver.*" \
    "nvidia-cuda-crt==$ver.*" "nvidia-nvvm==$ver.*"
fi
libs=$tk-libs
if [ ! -d "$libs/nvidia" ]; then
  echo "fetching cuBLAS, cuRAND and NVRTC for CUDA $ver into $libs" >&2
  # A separate target: pip --target does not merge into an existing nvidia/ folder.
  python3 -m pip install -q --no-deps --target "$libs" \
    "nvidia-cublas==$ver.*" "nvidia-curand" "nvidia-cuda-nvrtc==$ver.*"
fi

# The linker wants unversioned names; the wheels ship only the versioned ones.
lib=$home/lib
for f in "$libs"/nvidia/cu13/lib/*.so.*; do ln -sf "$f" "$lib/$(basename "$f")"; done
for f in "$lib"/lib{cudart,cublas,cublasLt,nvrtc,curand}.so.*; do
  [ -e "$f" ] && ln -sf "$(basename "$f")" "$lib/$(basename "$f" | sed -E 's/\.so\..*/.so/')"
done

stub=$lib/stubs/libcuda.so
if [ ! -e "$stub" ]; then
  cv=$(grep -A1 '^name = "cudarc"$' "$root/Cargo.lock" | sed -n 's/^version = "\(.*\)"$/\1/p')
  (cd "$root" && cargo fetch -q)
  cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cv" | head -1)
  mkdir -p "$(dirname "$stub")"
  grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+\(' "$cudarc/src/driver/sys/mod.rs" \
    | sed -E 's/pub unsafe fn (.*)\(/\1/' | sort -u \
    | awk '{print "int " $1 "(void) { return 999; }"}' >"$lib/stubs/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$lib/stubs/libcuda_stub.c"
fi

export CUDA_HOME=$home CUDA_PATH=$home CUDA_ROOT=$home CUDA_TOOLKIT_ROOT_DIR=$home
export PATH=$home/bin:$PATH
# No GPU to ask for its compute capability: 90 is Hopper (H100, H200).
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=$root/target/cuda-$ver
nvcc --version | tail -2 >&2
(cd "$root" && cargo build --release -p baton --features cuda)
mkdir -p "$(dirname "$out")"
strip -o "$out" "$CARGO_TARGET_DIR/release/baton"
xz -T0 -kf "$out"
echo "$out ($(du -h "$out" | cut -f1)); needs: $(readelf -d "$out" | grep -o 'lib[a-zA-Z]*\.so\.[0-9]*' | tr '\n' ' ')" >&2
