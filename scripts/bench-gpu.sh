#!/usr/bin/env bash
# Side-by-side benchmark on the GPU machine: TRL's KTOTrainer (plain and precompute) and `kto train` on the same
# TinyLlama-1.1B-shaped checkpoint, data and settings, in ONE invocation, then one table.
#
# Run on the GPU machine from the repository root, with the folder made by scripts/gpu-pack.sh:
#   bash scripts/bench-gpu.sh [.gpu] [STEPS]
# Settings (TRL's side is fixed by trl_kto_bench.py): batch 16, LoRA r 8 / alpha 16 / dropout 0.05 on all linears,
# max_length 384, bf16, beta 0.1, lr 5e-4 cosine, STEPS steps (default 45), the first 5 not timed.
set -euo pipefail
pack=${1:-.gpu}
steps=${2:-45}
work=${BENCH_WORK:-/tmp/kto-bench}
mkdir -p "$work"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}

# TRL and datasets come as wheels in the pack (the GPU machine has no network).
if [ -d "$pack/whl" ] && ! python3 -c "import trl" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$pack"/whl/*.whl
fi
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
xz -dc "$pack/kto.xz" > /tmp/kto && chmod +x /tmp/kto

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$work/gpu.txt"

# Peak GPU memory of a command, from nvidia-smi, above the memory in use before it started.
run_with_peak() {
  local name=$1; shift
  local base; base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$work/$name.mem" &
  local smi=$!
  "$@" > "$work/$name.out" 2> "$work/$name.err" || { kill $smi; echo "$name failed:"; tail -20 "$work/$name.err"; return 1; }
  kill $smi
  echo "$base" > "$work/$name.base"
}

# 1. TRL, which also makes the checkpoint and the data once.
for variant in plain precompute; do
  run_with_peak "trl-$variant" python3 "$pack/trl_kto_bench.py" "$work" "$variant" "$steps"
done

# 2. kto on the same checkpoint and data.
rm -rf "$work/kto-run"
run_with_peak kto /tmp/kto train --config configs/bench-tinyllama.toml --quiet \
  --set model.path="$work/tinyllama-random" --set data.train_file="$work/unpaired.jsonl" \
  --set train.output_dir="$work/kto-run" --set train.max_steps="$steps"
rm -rf "$work/kto-run-pre"
run_with_peak kto-precompute /tmp/kto train --config configs/bench-tinyllama.toml --quiet \
  --set model.path="$work/tinyllama-random" --set data.train_file="$work/unpaired.jsonl" \
  --set train.output_dir="$work/kto-run-pre" --set train.max_steps="$steps" --set kto.precompute_ref_log_probs=true

python3 scripts/bench_table.py "$work" "$steps" | tee "$work/table.md"
