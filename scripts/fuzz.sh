#!/usr/bin/env bash
# Fuzzes kto's input readers for a bounded time: the HH-RLHF conversation parser, the JSONL/JSON readers (every
# format) and data-file decoding (any bytes). Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Needs cargo-fuzz (installed here if missing) and a nightly compiler for -Zsanitizer; on a machine with only stable
# Rust, RUSTC_BOOTSTRAP=1 lets stable rustc accept the nightly flags (set below when `cargo +nightly` is absent).
# A crash stops its target and leaves the input in fuzz/artifacts/<target>/; turn it into a regression test in
# crates/kto-data/tests/fuzz_regressions.rs, fix it, and run the script again.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(hh_conversation jsonl_reader data_file_bytes)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
toolchain=()
if rustup run nightly rustc --version >/dev/null 2>&1; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi

# Seeds: the repository's own data files, so that the fuzzer starts from valid rows of every format.
for target in "${targets[@]}"; do
    corpus="$PWD/fuzz/corpus/$target"
    mkdir -p "$corpus"
    for seed in tests/fixtures/trl-kto-parity/data.jsonl data/*/*.jsonl; do
        [ -f "$seed" ] || continue
        name="seed-$(basename "$seed")"
        if [ "$target" = hh_conversation ]; then
            printf '\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine.' > "$corpus/seed-conversation"
        elif [ "$target" = jsonl_reader ]; then
            # the first byte selects the format
            { printf '\x00'; head -c 4096 "$seed"; } > "$corpus/$name"
        else
            head -c 4096 "$seed" > "$corpus/$name"
        fi
    done
done

status=0
for target in "${targets[@]}"; do
    echo "== fuzzing $target for ${seconds}s" >&2
    if ! cargo "${toolchain[@]}" fuzz run "$target" "$PWD/fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048; then
        echo "!! $target found a crash: see fuzz/artifacts/$target/" >&2
        status=1
    fi
done
exit $status
