#!/usr/bin/env bash
# Build kto with CUDA here (no GPU needed) and pack everything the GPU machine needs into .gpu/ (ignored by git):
# the kto binary and three test binaries (xz), TRL's bench script, the wheels TRL needs there and the
# compute-sanitizer wheel. The device tool carries at most 64 MiB: this script fails if the pack is bigger.
# Then, with the device tool, in one call:
#   run: bash scripts/gpu-check.sh .gpu        (carry: [".gpu"], timeout_s 600)
# and first, here: bash scripts/gpu-check.sh --dry-run .gpu
# CARGO_TARGET_DIR is honoured (e.g. /work/target-cuda, to keep the cuda build apart from target/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/cuda-toolchain.sh
# shellcheck disable=SC1091
source /opt/cuda13/env.sh

# The executable named NAME among cargo's JSON messages on stdin (wherever CARGO_TARGET_DIR puts it).
executable() {
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1" | tail -1
}

kto=$(cargo build --release --locked --features cuda -p kto-cli --message-format=json-render-diagnostics | executable kto)
[ -n "$kto" ] || { echo "gpu-pack.sh: cargo built no kto binary" >&2; exit 1; }
# The binary must say it is the cuda build (the first thing gpu-check.sh looks at). Running it here needs the driver
# library: the link-time stub stands in for it as libcuda.so.1 (it only has to load, --version touches no device).
stub=$(mktemp -d)
ln -s /opt/cuda13/lib64/stubs/libcuda.so "$stub/libcuda.so.1"
version=$(LD_LIBRARY_PATH=$stub:/opt/cuda13/lib64 "$kto" --version 2>&1 || true)
rm -rf "$stub"
case "$version" in
  "kto "*"(cuda: "*) echo "packing $version" ;;
  *) echo "gpu-pack.sh: $kto --version says '$version', not a cuda build" >&2; exit 1 ;;
esac
rm -rf .gpu && mkdir -p .gpu
git rev-parse --short HEAD > .gpu/COMMIT
git status --porcelain --untracked-files=no | grep -q . && echo "(uncommitted changes)" >> .gpu/COMMIT
xz -T2 -c "$kto" > .gpu/kto.xz
cp scripts/trl_kto_bench.py .gpu/

# The test binary of `cargo test --release --features FEATURES -p PACKAGE --test TEST`, packed as .gpu/NAME.xz.
pack_test() {
  local package=$1 test=$2 name=$3 features=${4:-cuda} exe
  exe=$(cargo test --release --locked --features "$features" -p "$package" --test "$test" --no-run \
    --message-format=json-render-diagnostics | executable "$test")
  [ -n "$exe" ] || { echo "no test binary for $package --test $test" >&2; exit 1; }
  xz -T2 -c "$exe" > ".gpu/$name.xz"
}
pack_test kto-kernels gpu kernels-gpu-test
pack_test kto-trainer trl_parity trl-parity-test
# The NCCL all-reduce with one rank (links libnccl.so.2: the GPU machine's comes with torch's nvidia-nccl wheel).
pack_test kto-trainer nccl nccl-test nccl

wheels=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_25_x86_64 --platform manylinux_2_17_x86_64)
python3 -m pip download -q "${wheels[@]}" -d .gpu/whl \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
python3 -m pip download -q "${wheels[@]}" -d .gpu/whl-sanitizer nvidia-cuda-sanitizer-api==13.0.85
ls -la .gpu .gpu/whl .gpu/whl-sanitizer
# The device tool's carry limit is 64 MiB for everything carried; .gpu is all that gpu-check.sh needs carried.
bytes=$(du -sb .gpu | cut -f1)
limit=$((64 * 1024 * 1024))
echo "pack: $bytes bytes ($((bytes / 1024 / 1024)) MiB) of the $((limit / 1024 / 1024)) MiB the device tool carries"
if [ "$bytes" -gt "$limit" ]; then
  echo "gpu-pack.sh: .gpu is over the device tool's 64 MiB carry limit: it would not reach the GPU machine" >&2
  exit 1
fi
