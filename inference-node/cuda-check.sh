#!/usr/bin/env bash
# Compiles every CUDA kernel for sm_60, 61, 70, 75, 80, 86, 89, 90 with
# NVRTC 12.x and prints the kernel × architecture table; no GPU needed.
# Part of `make test` (`make cuda-check` runs it alone). Installs NVRTC and
# the CUDA headers from PyPI into the cached venv when missing:
#   nvidia-cuda-nvrtc-cu12   libnvrtc.so.12 (CUDA 13's NVRTC no longer
#                            targets sm_60/61/70, so it must be 12.x)
#   nvidia-cuda-runtime-cu12 cuda_fp16.h / cuda_bf16.h (NVRTC ships none)
# Environment: COPYHOLD_CACHE (default ~/.cache/copyhold), COPYHOLD_VENV
# (default $COPYHOLD_CACHE/venv), CARGO_TARGET_DIR.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CACHE=${COPYHOLD_CACHE:-$HOME/.cache/copyhold}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
VENV=${COPYHOLD_VENV:-$CACHE/venv}
NVRTC_PIN=nvidia-cuda-nvrtc-cu12==12.9.86
RUNTIME_PIN=nvidia-cuda-runtime-cu12==12.9.79

site() { "$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
have() {
  [ -x "$VENV/bin/python" ] || return 1
  local sp; sp=$(site)
  [ -f "$sp/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ] && [ -f "$sp/nvidia/cuda_runtime/include/cuda_fp16.h" ]
}
if ! have; then
  echo "[cuda-check] installing $NVRTC_PIN and $RUNTIME_PIN into $VENV"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$NVRTC_PIN" "$RUNTIME_PIN"
fi
SP=$(site)
cargo build -q -p copyhold-node --bin copyhold-node
LD_LIBRARY_PATH="$SP/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  "$TARGET/debug/copyhold-node" cuda-check --cuda-include "$SP/nvidia/cuda_runtime/include" "$@"
