#!/usr/bin/env bash
# Builds what the CUDA tests need on a GPU machine that has no Rust
# toolchain, into one small folder (about 25 MB): the stripped node binary,
# the stripped `tests/cuda.rs` test binary, the fixtures, and
# run-gpu-tests.sh, which finds NVRTC/cuBLAS/headers there and runs every
# GPU test and `check-golden --device cuda`. See docs/cuda.md.
# Usage: inference-node/gpu-bundle.sh [OUT]   (default $CARGO_TARGET_DIR/gpu-bundle)
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
OUT=${1:-$TARGET/gpu-bundle}
FIXTURES=${COPYHOLD_FIXTURES:-$PWD/tests/fixtures}
cargo build -q -p copyhold-node --bin copyhold-node
test_bin=$(cargo test -q -p copyhold-node --test cuda --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
rm -rf "$OUT" && mkdir -p "$OUT/fixtures"
strip -o "$OUT/copyhold-node" "$TARGET/debug/copyhold-node"
strip -o "$OUT/cuda-tests" "$test_bin"
cp -r "$FIXTURES/tiny-llama" "$FIXTURES/tiny-llama-bf16" "$OUT/fixtures/"
chmod -R u+w "$OUT/fixtures"
cp inference-node/run-gpu-tests.sh "$OUT/"
du -sh "$OUT"
