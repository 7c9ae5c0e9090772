#!/usr/bin/env bash
# On the GPU machine, inside a folder made by gpu-bundle.sh: every GPU test
# of tests/cuda.rs (one at a time) and check-golden --device cuda on both
# fixtures. Needs the NVIDIA driver, NVRTC (12.x or 13.x) and the CUDA
# headers; cuBLAS is optional. Exit status: non-zero if anything failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
HERE=$PWD
LIBS=$HERE/culibs
mkdir -p "$LIBS"
SEARCH="${CUDA_HOME:-/usr/local/cuda}/lib64 /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu /usr/local/lib"
SEARCH="$SEARCH $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)"
find_lib() { for d in $SEARCH; do [ -d "$d" ] && find -L "$d" -maxdepth 4 -name "$1" 2>/dev/null; done | sort -V | tail -1; }
# cudarc's CUDA 12 bindings dlopen libX.so or libX.so.12, never libX.so.13:
# give CUDA 13 libraries (or 12 ones off the loader path) unversioned names.
extra=""
for lib in nvrtc cublas; do
  f=$(find_lib "lib$lib.so.12*"); [ -n "$f" ] || f=$(find_lib "lib$lib.so.13*")
  if [ -n "$f" ]; then
    ln -sf "$f" "$LIBS/lib$lib.so"
    extra="$extra:$(dirname "$(readlink -f "$f")")"
    echo "lib$lib: $f"
  else
    echo "lib$lib: not found"
  fi
done
export LD_LIBRARY_PATH="$LIBS$extra${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -z "${COPYHOLD_CUDA_INCLUDE:-}" ]; then
  for d in ${CUDA_HOME:-/usr/local/cuda}/include /usr/local/cuda/include $(python3 -c 'import site; print(" ".join(s + "/nvidia/cuda_runtime/include" for s in site.getsitepackages()))' 2>/dev/null); do
    if [ -f "$d/cuda_fp16.h" ]; then export COPYHOLD_CUDA_INCLUDE=$d; break; fi
  done
fi
echo "headers: ${COPYHOLD_CUDA_INCLUDE:-not found}"
export COPYHOLD_FIXTURES=$HERE/fixtures COPYHOLD_NODE_BIN=$HERE/copyhold-node
export COPYHOLD_KERNEL_CACHE=$HERE/cubin
nvidia-smi -L || true
rc=0
./cuda-tests --ignored --test-threads 1 || rc=1
for f in tiny-llama tiny-llama-bf16; do
  echo "check-golden --device cuda $f:"
  ./copyhold-node check-golden "fixtures/$f" --device cuda || rc=1
  echo "check-golden --device cuda --cuda-graphs $f:"
  ./copyhold-node check-golden "fixtures/$f" --device cuda --cuda-graphs || rc=1
done
exit $rc
