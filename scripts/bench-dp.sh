#!/usr/bin/env bash
# Data parallelism on the CPU, measured: the same run with 1 process and with `mpirun -n 2`, each process on ONE
# thread (RAYON_NUM_THREADS=1, CANDLE_NUM_THREADS=1), in one invocation; samples/s of each, the ratio (2.0 would be
# perfect scaling), and the gradient all-reduce's share of a step (kto's `kto::all_reduce` debug lines: the sum
# over MPI, as the slower rank sees it) beside the faster rank's wait for the slower one.
#
#   bash scripts/bench-dp.sh [TIMED_STEPS]      # default 10 timed steps after WARMUP (2) untimed ones
#
# Model: a random SmolLM2-135M-shaped Llama (hidden 576, intermediate 1536, 30 layers, 9 heads / 3 KV heads; the
# tiny model's 1024-token vocabulary), made once with kto-model's random_llama example. Data: data/hh-sample, batch
# 4 per process, max_length 128, LoRA r 8 on every linear (2.4 M floats all-reduced per step), f32, reference
# every step. Needs 2 free cores to mean anything: the load average is printed with the table.
# Environment: KTO_BIN (a kto built with --features mpi; default: cargo build --release -p kto-cli --features mpi),
# BENCH_WORK (default /tmp/kto-bench-dp), WARMUP.
set -euo pipefail
[ -n "${KTO_BIN:-}" ] && KTO_BIN=$(realpath "$KTO_BIN")
cd "$(dirname "$0")/.."
root=$PWD
timed=${1:-10}
warm=${WARMUP:-2}
steps=$((warm + timed))
work=${BENCH_WORK:-/tmp/kto-bench-dp}
mkdir -p "$work"
command -v mpirun >/dev/null || { echo "bench-dp.sh: mpirun not found (Debian: apt-get install openmpi-bin libopenmpi-dev)" >&2; exit 2; }
kto=${KTO_BIN:-}
if [ -z "$kto" ]; then
  cargo build -q --release --locked -p kto-cli --features mpi
  kto=${CARGO_TARGET_DIR:-$root/target}/release/kto
fi
model=$work/smollm2-shape
if [ ! -f "$model/model.safetensors" ]; then
  cargo run -q --locked -p kto-model --features testing --example random_llama -- "$model" 576 1536 30 9 3 1024
fi
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
export RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 RUST_LOG=info,kto::all_reduce=debug
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cat > "$work/dp.toml" <<TOML
[model]
path = "$model"
[data]
train_file = "$root/data/hh-sample/train.jsonl"
max_length = 128
[lora]
r = 8
alpha = 16
[train]
per_device_train_batch_size = 4
max_steps = $steps
logging_steps = 1
report_to = "none"
TOML
run() { # NAME LAUNCHER...
  local name=$1; shift
  rm -rf "$work/$name"
  "$@" "$kto" train --config "$work/dp.toml" --set train.output_dir="$work/$name" > "$work/$name.log" 2>&1 ||
    { tail -20 "$work/$name.log" >&2; exit 1; }
}
echo "1 process ..." >&2
run one env
echo "2 processes (mpirun -n 2 --bind-to core) ..." >&2
run two mpirun -n 2 --bind-to core --oversubscribe
python3 - "$work" "$warm" "$load_start" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, re, statistics, sys
work, warm, load_start, load_end = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def rates(name):
    rows = [json.loads(l) for l in open(f"{work}/{name}/metrics.jsonl") if l.strip()]
    # samples/s of each logged step (every rank's samples), the warm-up steps left out
    return [r["samples_per_second"] for r in rows if "loss" in r and "samples_per_second" in r][warm:]
one, two = rates("one"), rates("two")
# Both ranks log their all-reduce of each step, at about the same moment (the sum ends on both together): a step's
# two lines are consecutive. The slower rank arrives last and waits for no one: its time is the transfer; the faster
# rank's time adds its wait for the slower one (micro-batches of different lengths).
reduce = [float(m) for m in re.findall(r"gradient all-reduce seconds=([0-9.e-]+)", open(f"{work}/two.log").read())]
pairs = [sorted(reduce[i:i + 2]) for i in range(2 * warm, len(reduce) - 1, 2)]
transfer = statistics.median(p[0] for p in pairs)
wait = statistics.mean(p[1] - p[0] for p in pairs)
step_seconds = 8 / statistics.median(two)  # 2 ranks x batch 4 per step
print(f"| processes (1 thread each) | samples/s (median of {len(one)} steps) | vs 1 process "
      f"| all-reduce per step (median) | its share of a step | the faster rank's wait (mean) |")
print("|---|---|---|---|---|---|")
print(f"| 1 | {statistics.median(one):.3f} | 1.00x | - | - | - |")
print(f"| 2 (mpirun) | {statistics.median(two):.3f} | {statistics.median(two) / statistics.median(one):.2f}x "
      f"| {transfer * 1e3:.1f} ms | {transfer / step_seconds:.2%} | {wait * 1e3:.0f} ms ({wait / step_seconds:.1%}) |")
print(f"\nload average before {load_start}, after {load_end}")
PY
