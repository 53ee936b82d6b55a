#!/usr/bin/env bash
# Side-by-side CPU benchmark: TRL 1.16's KTOTrainer (+ PEFT 0.21, transformers 5.17, torch 2.11) and `kto train`, in
# ONE invocation, on the same data (same samples, same order) and settings, for the embedded tiny model and a
# SmolLM2-135M-shaped random checkpoint, on two data sets (the unpaired HH sample, and long prompts with short
# completions as in the GPU benchmark); kto twice, as configured (padding-free batches, prefix-shared KL) and with
# both switched off; then one markdown table with the kto/TRL ratios and the forward tokens per step.
#
#   bash scripts/bench-cpu.sh [TIMED_STEPS]          # default 20 timed steps after WARMUP (3) untimed ones
#
# Settings on both sides: batch 8, max_length 256, LoRA r 8 / alpha 16 / dropout 0.05 on q,k,v,o,gate,up,down
# (dropout zeroed by TRL's disable_dropout), f32, beta 0.1, KL pairs and reference log-probs every step,
# gradient accumulation 1, dataset order, logging every step, every core (kto: configs/bench-cpu.toml).
#
# Environment (all optional):
#   KTO_BIN=PATH           kto binary to time (default: `cargo build --release -p kto-cli`, then its binary)
#   KTO_BIN_BASELINE=PATH  a second kto binary (e.g. an older commit's), timed in the same run: one more row
#   WARMUP=3               untimed first steps, on both sides
#   BENCH_MODELS="tiny smollm2"   also: tinyllama (a random TinyLlama-1.1B-shaped f32 checkpoint, 4.4 GB, made once),
#                                 smollm2-gguf (the real SmolLM2-135M-Instruct Q4_1 file: KTO_SMOLLM2_GGUF or
#                                 ~/.cache/kto/SmolLM2-135M-Instruct.Q4_1.gguf, from scripts/get-smollm2.sh; TRL loads
#                                 it through transformers' GGUF reader, dequantized to f32)
#   BENCH_DATA="hh long"
#   BENCH_BATCH=8 BENCH_MAX_LENGTH=256   the batch on both sides (the 1.1B shape: 4 and 128 fit this machine's time)
#   KTO_VARIANTS="kto kto-plain"  kto, with any of these suffixes, each a setting, all with the same binary:
#                                 -plain: [kto] padding_free = false, kl_prefix_sharing = false (the work before
#                                 issue 14); -gc: [train] gradient_checkpointing = true (recompute each layer in
#                                 backward); -keep or -q8_0, -q4_0, -q4_1, -q4_k, -q5_k, -q6_k...: [model] quantize
#                                 (issue 24), e.g. "kto kto-q4_k kto-gc kto-gc-q4_k"; a quantized run's row carries
#                                 its ratios to the same run unquantized where that run is in the list
#   TRL_VARIANTS="gc nogc"  TRL with gradient checkpointing (KTOConfig's default) and without (kto has none):
#                           the kto rows carry their ratios to each
#   BENCH_THREADS=$(nproc) torch.set_num_threads / RAYON_NUM_THREADS
#   BENCH_WORK=/tmp/kto-bench-cpu   checkpoint, data, runs, logs and table.md
#   BENCH_VENV=.bench-venv          Python venv, made and pip-installed from PyPI on first use (~5 GiB: the PyPI
#                                   torch wheel is the CUDA build and needs its nvidia-* wheels to import)
#   PYTHON=python3                  the interpreter that makes the venv (3.10 or newer)
set -euo pipefail
# Paths given relative to the caller's folder stay so after the cd to the repository root.
for v in KTO_BIN KTO_BIN_BASELINE BENCH_WORK BENCH_VENV; do
  [ -n "${!v:-}" ] && printf -v "$v" '%s' "$(realpath -m "${!v}")"
done
cd "$(dirname "$0")/.."
root=$PWD
timed=${1:-20}
export BENCH_BATCH=${BENCH_BATCH:-8} BENCH_MAX_LENGTH=${BENCH_MAX_LENGTH:-256}  # read by the helper too
batch=$BENCH_BATCH
warm=${WARMUP:-3}
steps=$((warm + timed))
threads=${BENCH_THREADS:-$(nproc)}
models=${BENCH_MODELS:-tiny smollm2}
datasets=${BENCH_DATA:-hh long}
trl_variants=${TRL_VARIANTS:-gc nogc}
work=${BENCH_WORK:-/tmp/kto-bench-cpu}
venv=${BENCH_VENV:-$root/.bench-venv}
helper=$root/scripts/trl_kto_bench_cpu.py
[ "$timed" -ge 1 ] && [ "$warm" -ge 1 ] || { echo "need TIMED_STEPS >= 1 and WARMUP >= 1" >&2; exit 2; }
mkdir -p "$work"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
log() { echo "[bench-cpu $(date +%H:%M:%S)] $*" >&2; }

# 1. The Python side: a venv with the pinned stack, reused while the pins are unchanged.
# gguf: transformers' GGUF reader (the smollm2-gguf model).
pins=("torch==2.11.*" "transformers==5.17.*" "peft==0.21.*" "trl==1.16.*" "datasets==5.2.*" "accelerate" "gguf==0.19.*")
if [ "$(cat "$venv/.bench-pins" 2>/dev/null)" != "${pins[*]}" ]; then
  log "pip install ${pins[*]} into $venv (from PyPI; ~5 GiB and minutes when new)"
  t0=$(date +%s)
  [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}"
  echo "${pins[*]}" > "$venv/.bench-pins"
  log "venv ready in $(( $(date +%s) - t0 )) s, $(du -sh "$venv" | cut -f1)"
fi
py=$venv/bin/python

# 2. The kto binaries.
if [ -z "${KTO_BIN:-}" ]; then
  log "cargo build --release -p kto-cli"
  cargo build --release -q -p kto-cli
  KTO_BIN=${CARGO_TARGET_DIR:-$root/target}/release/kto
fi
runs=() bins=()
for v in ${KTO_VARIANTS:-kto kto-plain}; do
  [[ $v =~ ^kto(-(plain|gc|keep|q[0-9a-z_]+))*$ ]] || { echo "unknown KTO_VARIANTS entry $v (kto[-plain][-gc][-keep|-TYPE])" >&2; exit 2; }
  runs+=("$v"); bins+=("$KTO_BIN")
done
if [ -n "${KTO_BIN_BASELINE:-}" ]; then runs+=(kto-baseline); bins+=("$KTO_BIN_BASELINE"); fi
for b in "${bins[@]}"; do [ -x "$b" ] || { echo "not an executable: $b" >&2; exit 2; }; done

# Nothing may reach the hub; TRL on the CPU even where a GPU is present; both sides on every core.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME=$work/hf-home CUDA_VISIBLE_DEVICES=
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads TOKENIZERS_PARALLELISM=false

# Runs a command with its output in $1.out/.err and its peak RSS (the largest of the process tree's processes, from
# wait4's rusage, as /usr/bin/time -v reports it) in $1.time.
measured() {
  local out=$1; shift
  "$py" - "$out" "$@" <<'EOF' || { echo "failed: ${*:2}" >&2; tail -25 "$out.err" >&2; return 1; }
import resource, subprocess, sys
out = sys.argv[1]
with open(out + ".out", "w") as o, open(out + ".err", "w") as e:
    rc = subprocess.call(sys.argv[2:], stdout=o, stderr=e)
with open(out + ".time", "w") as f:
    f.write(f"Maximum resident set size (kbytes): {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\n")
sys.exit(rc)
EOF
}

# 3. Data: the HH sample made unpaired by `kto prepare` (its seeded order mixes the classes), train split only.
log "data: kto prepare data/hh-sample -> $work/unpaired.jsonl"
rm -rf "$work/prepared"
"$KTO_BIN" prepare --input data/hh-sample/train.jsonl data/hh-sample/test.jsonl --out "$work/prepared" \
  > "$work/prepare.out"
"$py" "$helper" data "$work/prepared/train.jsonl" "$work/unpaired.jsonl" >&2
"$py" "$helper" data-long "$work/unpaired.jsonl" "$work/long.jsonl" >&2
data_file() {
  case $1 in
    hh) echo "$work/unpaired.jsonl" ;;
    long) echo "$work/long.jsonl" ;;
    *) echo "unknown data set $1 (hh | long)" >&2; return 2 ;;
  esac
}
for data in $datasets; do
  samples=$(wc -l < "$(data_file "$data")")
  if [ $((steps * batch)) -gt "$samples" ]; then
    log "note: $data: $steps steps × $batch > $samples samples: the run goes into a second epoch (same order on both sides)"
  fi
done

model_dir() {
  case $1 in
    tiny) echo "$root/assets/tiny-llama" ;;
    smollm2|tinyllama)  # random checkpoints of the real shapes, made once (tinyllama: 4.4 GB, sharded)
      local d=$work/$1-random
      if [ ! -f "$d/model.safetensors.index.json" ] && [ ! -f "$d/model.safetensors" ]; then
        log "making the $1-shaped checkpoint in $d (once)"
        "$py" "$helper" make-$1 "$root/assets/tiny-llama" "$d" >&2
      fi
      echo "$d" ;;
    smollm2-gguf)
      local f=${KTO_SMOLLM2_GGUF:-$HOME/.cache/kto/SmolLM2-135M-Instruct.Q4_1.gguf}
      [ -f "$f" ] || { echo "smollm2-gguf: no file $f (bash scripts/get-smollm2.sh, or set KTO_SMOLLM2_GGUF)" >&2; return 2; }
      realpath "$f" ;;
    *) echo "unknown model $1 (tiny | smollm2 | tinyllama | smollm2-gguf)" >&2; return 2 ;;
  esac
}

# `kto train` arguments of run $1 on model folder $2 (into the array kto_args).
set_kto_args() {
  kto_args=(train --config "$root/configs/bench-cpu.toml" --set model.path="$2"
    --set data.train_file="$(data_file "$data")" --set train.output_dir="$work/$data/$model/$1/out"
    --set train.max_steps="$steps" --set train.per_device_train_batch_size="$batch"
    --set data.max_length="$BENCH_MAX_LENGTH")
  local part
  for part in $(tr - ' ' <<< "${1#kto}"); do
    case $part in
      plain) kto_args+=(--set kto.padding_free=false --set kto.kl_prefix_sharing=false) ;;
      gc) kto_args+=(--set train.gradient_checkpointing=true) ;;
      *) kto_args+=(--set model.quantize="$part") ;;
    esac
  done
}

# 4. Each data set and model: TRL, then every kto run, each in a fresh process.
for data in $datasets; do
for model in $models; do
  dir=$(model_dir "$model")
  at=$work/$data/$model
  mkdir -p "$at"
  for i in "${!runs[@]}"; do
    run=${runs[$i]}
    rm -rf "${at:?}/$run"; mkdir -p "$at/$run"
    set_kto_args "$run" "$dir"
    # The config must be accepted by this binary before anything is timed.
    "${bins[$i]}" "${kto_args[@]}" --print-config > "$at/$run/config.txt" 2> "$at/$run/config.err" \
      || { echo "${bins[$i]} rejects the config:" >&2; cat "$at/$run/config.err" >&2; exit 1; }
  done
  for variant in $trl_variants; do
    log "$data $model: TRL ($variant), $steps steps"
    rm -rf "${at:?}/trl-$variant"; mkdir -p "$at/trl-$variant"
    measured "$at/trl-$variant/trl" "$py" "$helper" trl "$dir" "$(data_file "$data")" \
      "$at/trl-$variant" "$steps" "$threads" "$variant"
  done
  for i in "${!runs[@]}"; do
    run=${runs[$i]}
    log "$data $model: $run (${bins[$i]}), $steps steps"
    set_kto_args "$run" "$dir"
    measured "$at/$run/kto" "${bins[$i]}" "${kto_args[@]}" --quiet
    ln -sf out/metrics.jsonl "$at/$run/metrics.jsonl"
  done
done
done

# 5. The table, with what it was measured on.
{
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  git diff --quiet HEAD -- crates Cargo.lock 2>/dev/null || commit+=" (+ uncommitted changes)"
  echo "CPU bench, $(date -u +%Y-%m-%d), commit $commit, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs),"\
    "$(nproc) cores, load average at the start $load_start, at the end $(cut -d' ' -f1-3 /proc/loadavg)"
  for i in "${!runs[@]}"; do echo "${runs[$i]}: ${bins[$i]} ($("${bins[$i]}" --version 2>/dev/null || echo '?'))"; done
  echo
  "$py" "$helper" table "$work" "$steps" "$warm" "$threads" $datasets -- $models -- \
    $(printf 'trl-%s ' $trl_variants) "${runs[@]}"
} | tee "$work/table.md"
