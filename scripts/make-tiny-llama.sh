#!/usr/bin/env bash
# Regenerate assets/tiny-llama/ (tokenizer trained on data/hh-sample + random tiny Llama) and show its checksums.
# Deterministic: running it twice gives identical files.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
cargo run --quiet -p kto-cli --example make_tiny_llama -- \
    --data-dir data/hh-sample --out-dir assets/tiny-llama "$@"
sha256sum assets/tiny-llama/*
