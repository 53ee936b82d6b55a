#!/usr/bin/env bash
# Installs a CUDA 13.0 build toolchain (nvcc, headers, cuBLAS/cuRAND/NVRTC/cudart, NCCL) from PyPI wheels into
# PREFIX (default /opt/cuda13) on a machine WITHOUT a GPU, plus a link-time stub libcuda.so, so that
# `cargo build --release --features cuda` works here. The binary it makes needs a real driver at run time.
#
#   bash scripts/cuda-toolchain.sh                    # once per machine, from the project root (~1 GiB, ~30 s)
#   source /opt/cuda13/env.sh                         # in every shell that builds with --features cuda
#   bash scripts/cuda-toolchain.sh --compiler-only    # nvcc + ptxas + headers only (~250 MiB): the PTX checks of
#                                                     # `cargo test` (CI runs this); not enough to link --features cuda
#
# 13.0 matches the driver (580, CUDA 13.0) and the libraries on the lent H100/H200 machines: PTX from a newer
# nvcc would not load there. The cuda build of candle-kernels takes ~10 minutes on 2 cores the first time.
set -euo pipefail
compiler_only=0
if [ "${1:-}" = "--compiler-only" ]; then compiler_only=1; shift; fi
PREFIX=${1:-/opt/cuda13}
if [ -x "$PREFIX/bin/nvcc" ] && { [ $compiler_only = 1 ] || { [ -f "$PREFIX/lib64/stubs/libcuda.so" ] && [ -e "$PREFIX/lib64/libnccl.so" ]; }; }; then
  echo "CUDA toolchain already in $PREFIX"; exit 0
fi
command -v python3 >/dev/null || { echo "cuda-toolchain.sh: python3 with pip is needed (the toolchain comes from PyPI wheels)"; exit 1; }
site="$PREFIX/site"
mkdir -p "$site" "$PREFIX/lib64/stubs"
tmp=$(mktemp -d)
wheels="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.*"
# NCCL for linking kto-trainer's `nccl` feature (its GPU test in the pack): the oldest CUDA 13 release, so that the
# symbols linked are in whatever libnccl.so.2 the GPU machine's torch ships.
[ $compiler_only = 1 ] || wheels="$wheels nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 nvidia-nccl-cu13==2.27.7"
# shellcheck disable=SC2086
set -f  # the version patterns are not file globs
python3 -m pip install -q --disable-pip-version-check --no-deps --target "$tmp/a" $wheels
set +f
cp -r "$tmp/a/nvidia" "$site/"
rm -rf "$tmp"
C="$site/nvidia/cu13"
ln -sfn "$C/bin" "$PREFIX/bin"
ln -sfn "$C/include" "$PREFIX/include"
ln -sfn "$C/nvvm" "$PREFIX/nvvm"
for f in "$C"/lib/*.so.* "$site"/nvidia/nccl/lib/*.so.*; do
  [ -e "$f" ] || continue
  b=$(basename "$f"); ln -sf "$f" "$PREFIX/lib64/$b"; ln -sf "$f" "$PREFIX/lib64/${b%%.so.*}.so"
done
if [ $compiler_only = 0 ]; then
  # Link-time stub for the driver library: every cu* entry point that cudarc declares, returning an error.
  # At run time the real libcuda.so.1 of the GPU machine is loaded instead.
  # cudarc's own list is the complete one: fetch the project's crates first when run from its root.
  [ -f Cargo.toml ] && cargo fetch -q 2>/dev/null || true
  src=$(find "${CARGO_HOME:-$HOME/.cargo}"/registry/src -path '*cudarc-*/src/driver/sys/mod.rs' 2>/dev/null | sort | tail -1 || true)
  { [ -n "$src" ] && grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+\(' "$src" | sed -E 's/pub unsafe fn (.*)\(/\1/'
    # the driver API of the header, with the versioned names (cuX_v2 ...) that its #defines map plain names to
    grep -oE '^CUresult CUDAAPI cu[A-Za-z0-9_]+' "$C/include/cuda.h" | awk '{print $3}'
    grep -oE '^ *#define +cu[A-Za-z0-9_]+ +cu[A-Za-z0-9_]+' "$C/include/cuda.h" | awk '{print $3}'; } |
    sort -u | awk '{print "int " $1 "(void){return 999;}"}' > "$PREFIX/lib64/stubs/cuda_stub.c"
  gcc -shared -fPIC -o "$PREFIX/lib64/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$PREFIX/lib64/stubs/cuda_stub.c"
fi
cat > "$PREFIX/env.sh" <<ENV
export PATH="$PREFIX/bin:\$PATH"
export CUDA_ROOT="$PREFIX" CUDA_PATH="$PREFIX" CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH="$PREFIX/lib64:$PREFIX/lib64/stubs:\${LIBRARY_PATH:-}"
ENV
echo "CUDA 13.0 toolchain in $PREFIX; now: source $PREFIX/env.sh"
