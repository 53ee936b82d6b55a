#!/usr/bin/env bash
# Build kto with CUDA here (no GPU needed) and pack everything the GPU machine needs into .gpu/ (ignored by git,
# under the device tool's 64 MiB carry limit): the kto binary and two test binaries (xz), TRL's bench script, the
# wheels TRL needs there and the compute-sanitizer wheel. Then, with the device tool, in one call:
#   run: bash scripts/gpu-check.sh .gpu        (carry: [".gpu"], timeout_s 560)
# and first, here: bash scripts/gpu-check.sh --dry-run .gpu
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/cuda-toolchain.sh
# shellcheck disable=SC1091
source /opt/cuda13/env.sh
cargo build --release --features cuda -p kto-cli
rm -rf .gpu && mkdir -p .gpu
git rev-parse --short HEAD > .gpu/COMMIT
xz -T2 -c target/release/kto > .gpu/kto.xz
cp scripts/trl_kto_bench.py .gpu/

# The test binary of `cargo test --release --features cuda -p PACKAGE --test TEST`, packed as .gpu/NAME.xz.
pack_test() {
  local package=$1 test=$2 name=$3 exe
  exe=$(cargo test --release --features cuda -p "$package" --test "$test" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$test" | tail -1)
  [ -n "$exe" ] || { echo "no test binary for $package --test $test" >&2; exit 1; }
  xz -T2 -c "$exe" > ".gpu/$name.xz"
}
pack_test kto-kernels gpu kernels-gpu-test
pack_test kto-trainer trl_parity trl-parity-test

wheels=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_25_x86_64 --platform manylinux_2_17_x86_64)
python3 -m pip download -q "${wheels[@]}" -d .gpu/whl \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
python3 -m pip download -q "${wheels[@]}" -d .gpu/whl-sanitizer nvidia-cuda-sanitizer-api==13.0.85
ls -la .gpu
du -sh .gpu
