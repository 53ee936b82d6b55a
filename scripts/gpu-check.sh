#!/usr/bin/env bash
# Everything a lent GPU machine must run, in ONE device call, from the pack scripts/gpu-pack.sh builds here (.gpu/,
# carried by the device tool). Writes gpu-report.md into $OUT (which the device tool brings back), else into the pack:
# a PASS / FAIL / SKIPPED (why) / TIMEOUT table first, then the kto-vs-TRL table, then each section's output tail.
# The report is rewritten after every section, so a run cut short still leaves what it found.
#
#   on the GPU machine:  bash scripts/gpu-check.sh [.gpu]           (device tool: carry [".gpu"], timeout_s 600)
#   here, without GPU:   bash scripts/gpu-check.sh --dry-run [.gpu]  (runs what a CPU can; PYTHON: an interpreter
#                        with torch, transformers and peft for the PEFT check, else .bench-venv/bin/python)
#   STEPS (default 20): training steps of d and e; KEEP_WORK=1 keeps the work folder (binaries, checkpoint, runs).
#
# Sections, verdict first; each runs whatever happened before it (no set -e across sections) under its own time
# limit, and all of them under GPU_CHECK_SECONDS (default 555 s from the start, unpacking included, so one 600 s
# device call holds it; the dry run allows 4 times as long everywhere, the CPU standing in for the GPU):
#   a. the GPU, the driver, the CUDA libraries, and `kto --version` saying it is the cuda build
#   b. the kernels against their CPU twins (kernels-gpu-test, KTO_REQUIRE_GPU=1: no device is a failure)
#   h. the NCCL gradient all-reduce with one rank (nccl-test, KTO_REQUIRE_GPU=1; needs the machine's libnccl.so.2)
#   c. the TRL parity fixture on CUDA in f32, bf16, f16 (trl-parity-test)
#   d. `kto train` alone on the TinyLlama-1.1B shape (random weights made here), STEPS steps, plain and precompute
#   e. TRL's KTOTrainer beside it: same checkpoint, data, settings and steps, plain and precompute
#   f. compute-sanitizer memcheck and racecheck on the kernel tests
#   g. PEFT loads the adapter of d
#   d-q4k (last, if time is left). kto train plain with [model] quantize = "q4_k": the peak memory beside d's bf16 base
set -uo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
pack=${1:-.gpu}
steps=${STEPS:-20}
deadline=${GPU_CHECK_SECONDS:-555}
# The dry run stands the CPU (2 busy cores here) in for the GPU machine's 16: its limits are 4 times longer.
slack=1
[ $dry = 1 ] && slack=4 && deadline=$((deadline * slack))
start=$(date +%s)
cd "$(dirname "$0")/.." || exit 2
root=$PWD
[ -d "$pack" ] || { echo "no pack at $pack: run bash scripts/gpu-pack.sh first" >&2; exit 2; }
pack=$(cd "$pack" && pwd)
out=${OUT:-$pack}
mkdir -p "$out"
report=$out/gpu-report.md
logs=$(mktemp -d /tmp/kto-gpu-check.XXXX)
# The unpacked binaries and the 2.2 GB checkpoint go with it; the report and small logs are copied to $out first.
[ "${KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$logs"' EXIT
bin=$logs/bin
work=${BENCH_WORK:-$logs/bench}
mkdir -p "$bin" "$work"
export dry pack steps root bin work logs
# Error messages name the failure; backtraces would fill the report's output tails (the full logs come back too).
export RUST_BACKTRACE=0

# ---- the pack ---------------------------------------------------------------------------------------------------
for f in kto.xz kernels-gpu-test.xz trl-parity-test.xz nccl-test.xz trl_kto_bench.py; do
  [ -f "$pack/$f" ] || { echo "the pack lacks $f: rerun scripts/gpu-pack.sh" >&2; exit 2; }
done
binaries="kto kernels-gpu-test trl-parity-test nccl-test"
for f in $binaries; do
  if ! xz -dc "$pack/$f.xz" > "$bin/$f"; then echo "cannot unpack $pack/$f.xz" >&2; exit 2; fi
  chmod +x "$bin/$f"
done
if [ $dry = 1 ]; then
  # No driver here: the link-time stub of cuda-toolchain.sh stands in for libcuda.so.1 (every call fails: no device).
  stub=${CUDA_ROOT:-/opt/cuda13}/lib64/stubs/libcuda.so
  [ -f "$stub" ] || { echo "the dry run needs the CUDA stub of scripts/cuda-toolchain.sh ($stub)" >&2; exit 2; }
  ln -sf "$stub" "$bin/libcuda.so.1"
  export LD_LIBRARY_PATH=$bin:${LD_LIBRARY_PATH:-}
fi

# ---- the CUDA libraries: searched for, not assumed ------------------------------------------------------------------
# The binaries need cuBLAS, cuRAND, NVRTC, cudart (13) and the driver's libcuda.so.1. Where they are differs by machine:
# a CUDA install, the distribution's lib dir, the loader cache, or the nvidia-* wheels torch ships in site-packages.
python_sites=$(for py in python3 ${PYTHON:-}; do
  "$py" -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2> /dev/null
done)
lib_places() {
  local d
  for d in /usr/local/cuda*/targets/*/lib /usr/local/cuda*/lib64 /usr/lib/x86_64-linux-gnu /usr/lib64; do
    [ -d "$d" ] && echo "$d"
  done
  ldconfig -p 2>/dev/null | awk -F'=> ' '/=>/ {print $2}' | xargs -r -n1 dirname | sort -u
  while read -r s; do
    [ -n "$s" ] && for d in "$s"/nvidia/*/lib; do [ -d "$d" ] && echo "$d"; done
  done <<< "$python_sites"
  # the build toolchain of cuda-toolchain.sh (here, for the dry run)
  d=${CUDA_ROOT:-/opt/cuda13}/lib64
  if [ -d "$d" ]; then echo "$d"; fi
}
libs_found=""
missing=$(for b in $binaries; do ldd "$bin/$b" 2>/dev/null; done |
  awk '/=> not found/ {print $1}' | sort -u)
for lib in $missing; do
  hit=$(lib_places | while read -r d; do [ -e "$d/$lib" ] && { echo "$d"; break; }; done)
  if [ -n "$hit" ]; then
    export LD_LIBRARY_PATH=$hit:${LD_LIBRARY_PATH:-}
  fi
done
# Where each CUDA library resolves now (or "not found"), for the report: "libcublas.so.13 => /path".
libs_found=$(for b in $binaries; do ldd "$bin/$b" 2>/dev/null; done |
  awk '/lib(cuda|cublas|cublasLt|curand|nvrtc|cudart|nccl)[.]/ {print $1, "=>", ($3 == "not" ? "NOT FOUND" : $3)}' | sort -u)
export LD_LIBRARY_PATH libs_found

# ---- sections -----------------------------------------------------------------------------------------------------
declare -a rows=()   # "key|name|verdict|seconds|limit"
# section KEY NAME BUDGET FUNCTION ARGS...: KEY is unique (its log's name), its first letter the section's (a..g).
# The function says why through $VERDICT (one line) and its exit status: 0 PASS, 3 SKIPPED, other FAIL.
section() {
  local id=$1 name=$2 budget=$3; shift 3
  local log=$logs/$id.log now left limit rc verdict why took
  now=$(date +%s)
  left=$((deadline - (now - start)))
  if [ "$left" -lt 5 ]; then
    rows+=("$id|$name|TIMEOUT (not started: the check's ${deadline} s were spent)|0|$budget")
    echo "(not started)" > "$log"
    last_verdict="TIMEOUT (not started)"; write_report; return
  fi
  budget=$((budget * slack))
  limit=$((budget < left ? budget : left))
  export VERDICT=$logs/$id.verdict
  : > "$VERDICT"
  echo "== ${id:0:1}. $name (limit ${limit}s)"
  timeout -k 5 "$limit" bash -c '"$@"' _ "$@" > "$log" 2>&1
  rc=$?
  took=$(($(date +%s) - now))
  why=$(head -1 "$VERDICT")
  case $rc in
    0) verdict="PASS${why:+ ($why)}" ;;
    3) verdict="SKIPPED (${why:-no reason given})" ;;
    124 | 137) verdict="TIMEOUT (after ${limit}s)" ;;
    *) verdict="FAIL (${why:-exit $rc})" ;;
  esac
  echo "   $verdict, ${took}s"
  rows+=("$id|$name|$verdict|$took|$limit")
  last_verdict=$verdict
  write_report
}
say() { echo "$*" > "$VERDICT"; }
export -f say

# Sections that FAIL or TIMEOUT.
count_bad() {
  local row bad=0
  for row in "${rows[@]}"; do case $row in *"|FAIL"* | *"|TIMEOUT"*) bad=$((bad + 1)) ;; esac; done
  echo "$bad"
}

write_report() {
  local row id name verdict took budget i
  {
    echo "# kto GPU check, $(date -u +%Y-%m-%dT%H:%MZ), pack of commit $(tr '\n' ' ' < "$pack/COMMIT" 2>/dev/null)"
    echo
    if [ $dry = 1 ]; then
      echo "DRY RUN on $(hostname) without a GPU: GPU-only sections are SKIPPED; the rest runs on the CPU."
    else
      echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
    fi
    echo
    echo "| section | outcome | seconds | limit |"
    echo "|---|---|---|---|"
    for row in "${rows[@]}"; do
      IFS='|' read -r id name verdict took budget <<< "$row"
      echo "| ${id:0:1}. $name | $verdict | $took | $budget |"
    done
    echo
    echo "$(count_bad) of ${#rows[@]} sections FAIL or TIMEOUT; $(($(date +%s) - start)) s in all (limit ${deadline} s)."
    echo
    echo "## kto and TRL, TinyLlama-1.1B shape, random weights, $steps steps (the first 5 not timed)"
    echo
    python3 "$root/scripts/bench_table.py" "$work" "$steps" 2>&1
    echo
    echo "## CUDA libraries (as the binaries resolve them)"
    echo
    echo '```'
    echo "${libs_found:-none of the CUDA libraries is linked?}"
    echo '```'
    for i in "${!rows[@]}"; do
      IFS='|' read -r id name verdict took budget <<< "${rows[$i]}"
      echo
      echo "## ${id:0:1}. $name: $verdict, ${took} s"
      echo
      echo '```'
      tail -n 60 "$logs/$id.log"
      echo '```'
    done
  } > "$report.tmp" && mv "$report.tmp" "$report"
}

# libtest LOG BINARY ARGS...: runs a libtest binary (tee into LOG); status of the binary; $VERDICT says how many ran.
libtest() {
  local log=$1; shift
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]} passed
  passed=$(grep -oE 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
  if ! grep -q "^running [0-9]* test" "$log"; then
    say "no test ran (exit $rc): $(grep -v '^\s*$' "$log" | tail -1 | cut -c1-160)"; [ "$rc" = 0 ] && rc=1
  elif [ "$rc" = 0 ] && [ "$passed" = 0 ]; then
    say "the binary ran no test"; rc=1
  elif [ "$rc" = 0 ]; then
    say "tests passed: $passed"
  else
    say "tests failed: $(grep -cE '^test .*FAILED$' "$log"), passed: $passed (exit $rc)"
  fi
  return "$rc"
}
export -f libtest

# Peak GPU memory of a run: nvidia-smi's used memory every 100 ms, and the memory in use just before it started.
with_peak() {
  local name=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1 > "$work/$name.base"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$work/$name.mem" &
  local smi=$! rc
  "$@"
  rc=$?
  kill "$smi" 2> /dev/null
  return "$rc"
}
export -f with_peak

# A Python with torch, transformers and peft: $PYTHON, the bench venv, python3.
find_python() {
  local py
  for py in "${PYTHON:-}" "$root/.bench-venv/bin/python" python3; do
    [ -n "$py" ] && "$py" -c 'import torch, transformers, peft, safetensors' 2> /dev/null && { echo "$py"; return; }
  done
}
export -f find_python

# a. Every later section needs this to pass; it also proves the binary starts (it links libcuda and cuBLAS at start).
sec_a() {
  if [ "$dry" = 0 ]; then
    nvidia-smi || { say "nvidia-smi failed: no driver or no GPU"; return 1; }
  fi
  echo "CUDA libraries:"; echo "$libs_found"
  if grep -q "NOT FOUND" <<< "$libs_found"; then say "a CUDA library was not found (see the list)"; return 1; fi
  grep -q "^libcuda.so.1 => /" <<< "$libs_found" || { say "the binaries link no libcuda.so.1: not a cuda build"; return 1; }
  local v
  v=$("$bin/kto" --version 2>&1)
  echo "kto --version: $v"
  case $v in
    "kto "*"(cuda: "*) if [ "$dry" = 1 ]; then say "$v; dry run: it starts against the CUDA stub"; else say "$v"; fi ;;
    *) say "kto --version says '$v': not a cuda build that starts"; return 1 ;;
  esac
}
export -f sec_a

# b and h. KTO_REQUIRE_GPU=1: without a device every test must fail, so a pass can only come from the GPU.
gpu_tests() {
  local id=$1 binary=$2 rc
  KTO_REQUIRE_GPU=1 libtest "$logs/$id.tests" "$bin/$binary" --test-threads=1 --nocapture
  rc=$?
  if [ "$dry" = 1 ]; then
    if [ "$rc" = 0 ]; then
      say "the binary passed without a device: KTO_REQUIRE_GPU=1 is not honoured (an old test binary?)"; return 1
    elif grep -q "test result: FAILED" "$logs/$id.tests" && grep -q "no CUDA device" "$logs/$id.tests"; then
      say "dry run: KTO_REQUIRE_GPU=1 refused to pass without a device, as it must"; return 3
    fi
    say "the binary failed, but not for want of a device (exit $rc)"; return 1
  fi
  [ "$rc" = 0 ] || return "$rc"
  if grep -q "SKIPPED" "$logs/$id.tests"; then say "a test was skipped on the GPU machine"; return 1; fi
}
export -f gpu_tests

# c. The fixture of TRL's own run: f32 with TRL's tolerances; bf16 and f16 loss and rewards within 2e-2.
sec_c() {
  local dtype=$1 device=cuda
  if [ "$dry" = 1 ]; then
    [ "$dtype" = f32 ] || { say "dry run: $dtype is judged on CUDA only"; return 3; }
    device=cpu
  fi
  echo "KTO_TEST_DEVICE=$device KTO_TEST_DTYPE=$dtype"
  KTO_TEST_DEVICE=$device KTO_TEST_DTYPE=$dtype KTO_FIXTURE_DIR=$root/tests/fixtures/trl-kto-parity \
    libtest "$logs/c-$dtype.tests" "$bin/trl-parity-test" --test-threads=1
}
export -f sec_c

# d. The checkpoint and data of trl_kto_bench.py (torch, transformers, tokenizers, safetensors: no TRL), 16 x STEPS
# rows (every row trained once; the precompute passes cover no more than that).
sec_make() {
  [ "$dry" = 0 ] || { say "dry run: makes a 1.1B checkpoint on the GPU"; return 3; }
  BENCH_SAMPLES=$((16 * steps)) python3 "$pack/trl_kto_bench.py" "$work" make || { say "making the checkpoint failed"; return 1; }
  say "checkpoint $(du -sh "$work/tinyllama-random" | cut -f1), $(wc -l < "$work/unpaired.jsonl") rows"
}
export -f sec_make

# kto train on it. A run that stops early still leaves metrics.jsonl rows (logging_steps = 1) for the table.
sec_kto() {
  local variant=$1 run=$work/kto-$1 precompute=false quantize=none
  [ "$variant" = precompute ] && precompute=true
  # issue 24: the plain run with the base's matrices held as q4_k blocks (quantized at load), for its memory
  [ "$variant" = q4k ] && quantize=q4_k
  [ "$dry" = 0 ] || { say "dry run: the TinyLlama shape in bf16 on the GPU"; return 3; }
  [ -f "$work/tinyllama-random/model.safetensors" ] || { say "no checkpoint: its section failed"; return 3; }
  rm -rf "$run"
  KTO_CACHE_DIR=$work/kto-cache with_peak "kto-$variant" "$bin/kto" train --config "$root/configs/bench-tinyllama.toml" \
    --quiet --set model.path="$work/tinyllama-random" --set data.train_file="$work/unpaired.jsonl" \
    --set train.output_dir="$run" --set train.max_steps="$steps" --set kto.precompute_ref_log_probs=$precompute \
    --set model.quantize=$quantize ||
    { say "kto train failed"; return 1; }
  python3 - "$run/metrics.jsonl" "$steps" <<'PY' || { say "the run's metrics are incomplete or not finite"; return 1; }
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
train = [r for r in rows if "loss" in r and "step" in r]
assert train and train[-1]["step"] == int(sys.argv[2]), f"last step {train[-1]['step'] if train else None}"
assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train), "non-finite loss or grad_norm"
print(f"{len(train)} steps, last loss {train[-1]['loss']:.4f}, samples/s of the last step {train[-1]['samples_per_second']}")
PY
  say "$steps steps, finite loss and gradient norm"
}
export -f sec_kto

# e. TRL and datasets come as wheels in the pack (the GPU machine has no network and no TRL).
sec_trl() {
  local variant=$1
  [ "$dry" = 0 ] || { say "dry run: TRL on the GPU"; return 3; }
  [ -f "$work/tinyllama-random/model.safetensors" ] || { say "no checkpoint: its section failed"; return 3; }
  if ! python3 -c "import trl" 2> /dev/null; then
    [ -d "$logs/site/trl" ] || python3 -m pip install -q --no-index --no-deps --target "$logs/site" "$pack"/whl/*.whl ||
      { say "installing the TRL wheels of the pack failed"; return 1; }
    export PYTHONPATH=$logs/site:${PYTHONPATH:-}
  fi
  with_peak "trl-$variant" python3 "$pack/trl_kto_bench.py" "$work" "$variant" "$steps" > "$work/trl-$variant.out" ||
    { say "TRL failed"; return 1; }
  cat "$work/trl-$variant.out"
  say "$(grep '^{' "$work/trl-$variant.out" | tail -1 | python3 -c 'import json, sys; r = json.loads(sys.stdin.read())
print("%s samples/s, torch peak %s GiB" % (r["samples_per_s"], r["peak_gib"]))' 2>&1)"
}
export -f sec_trl

# f. The machine's compute-sanitizer, else the pack's wheel. KTO_REQUIRE_GPU=1: a run without a device cannot pass.
find_sanitizer() {
  local s c
  s=$(command -v compute-sanitizer)
  for c in /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer; do
    [ -z "$s" ] && [ -x "$c" ] && s=$c
  done
  if [ -z "$s" ] && ls "$pack"/whl-sanitizer/*.whl > /dev/null 2>&1; then
    [ -d "$logs/sanitizer" ] || python3 -m zipfile -e "$pack"/whl-sanitizer/*.whl "$logs/sanitizer" > /dev/null
    s=$(find "$logs/sanitizer" -name compute-sanitizer -type f | head -1)
    [ -n "$s" ] && chmod +x "$s"
  fi
  echo "$s"
}
export -f find_sanitizer
sec_f() {
  local tool=$1 s
  s=$(find_sanitizer)
  [ -n "$s" ] || { say "no compute-sanitizer on the machine and none in the pack"; return 1; }
  # the wheel's injection libraries lie in ../lib beside its bin/
  local lib
  lib=$(dirname "$s")/../lib
  if [ -d "$lib" ]; then export LD_LIBRARY_PATH=$lib:$LD_LIBRARY_PATH; fi
  echo "compute-sanitizer: $s"; "$s" --version || { say "$s does not start"; return 1; }
  [ "$dry" = 0 ] || { say "dry run: needs a GPU; compute-sanitizer $("$s" --version | grep -oE 'Version [0-9.]+' | cut -d' ' -f2) starts"; return 3; }
  KTO_REQUIRE_GPU=1 libtest "$logs/f-$tool.tests" "$s" --tool "$tool" --error-exitcode 9 --target-processes all \
    "$bin/kernels-gpu-test" --test-threads=1 || return 1
  grep -qE "ERROR SUMMARY: 0 errors|RACECHECK SUMMARY: 0 hazards" "$logs/f-$tool.tests" ||
    { say "no clean sanitizer summary in the output"; return 1; }
}
export -f sec_f

# g. PEFT loads kto's adapter (on the GPU: the adapter of d; in the dry run: a tiny CPU run made here).
sec_g() {
  local py base adapter device=cuda
  py=$(find_python)
  if [ "$dry" = 1 ]; then
    base=$root/assets/tiny-llama adapter=$work/tiny-run/adapter device=cpu
    "$bin/kto" train --config "$root/configs/tiny.toml" --quiet --set model.device=cpu --set train.max_steps=3 \
      --set train.output_dir="$work/tiny-run" || { say "kto train on the tiny model (CPU) failed"; return 1; }
  else
    base=$work/tinyllama-random adapter=$work/kto-plain/adapter
  fi
  [ -f "$adapter/adapter_model.safetensors" ] || { say "no adapter at $adapter: its run failed"; return 3; }
  [ -n "$py" ] || { say "no Python with torch, transformers and peft (set PYTHON, or make .bench-venv: scripts/bench-cpu.sh)"; return 3; }
  echo "python: $py"
  local result
  result=$("$py" "$root/scripts/peft_check.py" "$base" "$adapter" "$device")
  local rc=$?
  echo "$result"
  [ "$rc" = 0 ] || { say "PEFT check failed: $result"; return 1; }
  say "$(tail -1 <<< "$result" | python3 -c 'import json, sys; r = json.loads(sys.stdin.read())
print("%d LoRA tensors loaded exactly, logits change by %.3g" % (r["tensors"], r["max_logit_change"]))')"
}
export -f sec_g

# Budgets (seconds), from what is measured: TRL on an H100 (../shared/GPU.md, 2026-11-22): plain 0.64-0.68 s/step,
# precompute 0.353 s/step + 28 s of precompute per 2048 samples. kto on a GPU is UNMEASURED: candle's stock ops gave
# 47 ms forward + backward per TinyLlama layer (GPU.md §4), ~2 s per KTO step for 22 layers; allowed: 3 s/step.
# The kernel tests include real model sizes (LoRA rank 128 over TinyLlama's q|k|v, vocabularies of 32000/49152) in
# three dtypes, each also computed by the CPU twins; the sanitizers slow the GPU side 10-100x: guesses, not measured.
# Sum at 20 steps: 10 + 45 + 15 + 3*20 + 45 + 2*80 + 60 + 50 + 2*40 + 30 = 555 s, the 555 s deadline.
section a "GPU, driver, CUDA libraries, kto --version" 10 sec_a
section b "kernels vs their CPU twins (KTO_REQUIRE_GPU=1)" 45 gpu_tests b kernels-gpu-test  # PTX JIT, context, CPU twins of real sizes
# a communicator on one GPU and two all-reduces (6.3 M and 1000 floats): context + NCCL init, a few seconds
section h "NCCL all-reduce, one rank (KTO_REQUIRE_GPU=1)" 15 gpu_tests h nccl-test
for dtype in f32 bf16 f16; do
  # 3 tests on a 4-sample fixture: 0.4 s on 2 CPU cores in f32 (dry run); the rest is CUDA context and PTX JIT
  section "c-$dtype" "TRL parity fixture, $dtype" 20 sec_c "$dtype"
done
section d-make "TinyLlama-shaped checkpoint and data ($((16 * steps)) rows)" 45 sec_make  # import + 2.2 GB save
for variant in plain precompute; do
  section "d-$variant" "kto train $variant, $steps steps" $((20 + 3 * steps)) sec_kto "$variant"
  echo "$last_verdict" > "$work/kto-$variant.status"
done
section e-plain "TRL plain, $steps steps" $((40 + steps)) sec_trl plain  # wheels + imports + load ~30 s, <1 s/step
echo "$last_verdict" > "$work/trl-plain.status"
# + precompute: 28 s per 2048 samples, 16 x steps samples here
section e-precompute "TRL precompute, $steps steps" $((30 + steps)) sec_trl precompute
echo "$last_verdict" > "$work/trl-precompute.status"
write_report
for tool in memcheck racecheck; do
  section "f-$tool" "compute-sanitizer $tool (kernel tests)" 40 sec_f "$tool"
done
section g "PEFT loads kto's adapter" 30 sec_g
# Last, in whatever time is left (TIMEOUT "not started" when none): its budget is not in the 555 s sum above.
section d-q4k "kto train plain, base held as q4_k, $steps steps" $((20 + 3 * steps)) sec_kto q4k
echo "$last_verdict" > "$work/kto-q4k.status"
write_report

# Logs beside the report (small files only: the checkpoint stays behind).
if [ "$out" != "$pack" ] || [ $dry = 1 ]; then
  mkdir -p "$out/gpu-check-logs"
  cp "$logs"/*.log "$out/gpu-check-logs/" 2> /dev/null
  (cd "$work" && find . -maxdepth 2 \( -name '*.out' -o -name '*.mem' -o -name '*.base' -o -name '*.status' \
    -o -name metrics.jsonl \) -exec cp --parents {} "$out/gpu-check-logs/" \;) 2> /dev/null
fi
failed=$(count_bad)
echo "$failed section(s) FAIL or TIMEOUT; report: $report"
[ "$failed" = 0 ]
