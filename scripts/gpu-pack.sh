#!/usr/bin/env bash
# Build kto with CUDA here (no GPU needed) and pack what the GPU machine needs into .gpu/ (ignored by git):
# the binary (xz), TRL's bench script, the wheels TRL needs there and the kernels' GPU test binary. Then, with the device tool:
#   run: bash scripts/bench-gpu.sh .gpu        (carry: [".gpu"])
set -euo pipefail
bash scripts/cuda-toolchain.sh
source /opt/cuda13/env.sh
cargo build --release --features cuda -p kto-cli
mkdir -p .gpu
xz -T2 -c target/release/kto > .gpu/kto.xz
cp scripts/trl_kto_bench.py .gpu/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/whl \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# The kernels' GPU-vs-CPU-twin test binary (crates/kto-kernels/tests/gpu.rs).
test_bin=$(cargo test --release -p kto-kernels --features cuda --test gpu --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="gpu": print(m["executable"])' | tail -1)
cp "$test_bin" .gpu/kernels-gpu-test
ls -la .gpu
