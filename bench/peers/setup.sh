#!/usr/bin/env bash
# Installs the peers `copyhold-node bench` compares with, under
# ${COPYHOLD_PEERS:-~/.cache/copyhold/peers} (never inside the repository):
#   llama.cpp/build/bin/{llama-bench,llama-batched-bench}  (from the PyPI
#       source package llama-cpp-python, which vendors llama.cpp, extracted
#       under llamacpp/; llama.cpp links to its vendor/llama.cpp; ~15 min
#       on 2 cores)
#   llama.cpp/build-avx2/bin/llama-bench  (the same, AVX2 only)
#   hfvenv/  torch (CPU use) + transformers + safetensors + gguf + numpy
# and writes the benchmark model (llama shape hidden 1024, 24 layers, 16
# heads, 8 KV heads, FFN 2816, vocab 32000, f16) and its GGUF f16 copy under
# models/. Idempotent: what exists is kept. Needs CARGO_TARGET_DIR's release
# copyhold-node built first (or COPYHOLD_NODE=path).
set -euo pipefail
P=${COPYHOLD_PEERS:-$HOME/.cache/copyhold/peers}
HERE=$(cd "$(dirname "$0")" && pwd)
NODE=${COPYHOLD_NODE:-${CARGO_TARGET_DIR:-$HERE/../../target}/release/copyhold-node}
mkdir -p "$P"
cd "$P"

# llama.cpp: the source package is extracted under llamacpp/ and built in
# place (build/; tools on: a configure that turned them off gets them back);
# llama.cpp is a link to that source tree, so the binaries are at
# llama.cpp/build/bin/. Other builds of the same tree (bench/peers AVX2
# variants) sit next to build/.
# cmake: the system's, else one from PyPI in llvenv/.
cmake_bin() {
  if command -v cmake >/dev/null; then command -v cmake; return; fi
  [ -x "$P/llvenv/bin/cmake" ] || { [ -d llvenv ] || python3 -m venv llvenv; llvenv/bin/pip install -q cmake; }
  echo "$P/llvenv/bin/cmake"
}
if [ ! -x llama.cpp/build/bin/llama-bench ] || [ ! -x llama.cpp/build/bin/llama-batched-bench ]; then
  CMAKE=$(cmake_bin)
  mkdir -p llamacpp
  if ! ls llamacpp/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    [ -d llvenv ] || python3 -m venv llvenv
    llvenv/bin/pip download -q --no-deps --no-binary llama-cpp-python llama-cpp-python -d llamacpp
  fi
  SRC=$(ls -d llamacpp/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | tail -1 || true)
  if [ -z "$SRC" ]; then
    tar -C llamacpp -xzf "$(ls llamacpp/llama_cpp_python-*.tar.gz | tail -1)"
    SRC=$(ls -d llamacpp/llama_cpp_python-*/vendor/llama.cpp | tail -1)
  fi
  ln -sfn "$P/$SRC" llama.cpp
  # On a CPU with AMX-INT8, ggml's AMX path segfaults in
  # ggml_backend_amx_mul_mat on Q4_K/Q8_0 files (ggml-org/llama.cpp#20824,
  # seen here with every thread count): build for the CPU's other x86
  # features, so the AVX-512 VNNI kernels and repacking still run.
  X86=(-DGGML_NATIVE=ON)
  if grep -qw amx_int8 /proc/cpuinfo; then
    X86=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
      -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON
      -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
      -DGGML_AMX_BF16=OFF)
  fi
  (cd "$SRC" &&
    "$CMAKE" -B build -DLLAMA_CURL=OFF "${X86[@]}" -DCMAKE_BUILD_TYPE=Release \
      -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF &&
    nice "$CMAKE" --build build -j2 --target llama-bench llama-batched-bench)
fi

# The same llama.cpp built for AVX2 only (no AVX-512, AVX-VNNI or AMX), to
# compare with copyhold-node's AVX2 kernels (COPYHOLD_KERNELS=avx2) on an
# AVX-512 machine: bench/results/inference-node-avx2.md.
if [ ! -x llama.cpp/build-avx2/bin/llama-bench ]; then
  CMAKE=$(cmake_bin)
  (cd llama.cpp &&
    "$CMAKE" -B build-avx2 -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
      -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF \
      -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF \
      -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DCMAKE_BUILD_TYPE=Release &&
    nice "$CMAKE" --build build-avx2 -j2 --target llama-bench)
fi

if [ ! -x hfvenv/bin/python ] || ! hfvenv/bin/python -c 'import torch, transformers, gguf' 2>/dev/null; then
  python3 -m venv hfvenv
  hfvenv/bin/pip install -q torch transformers safetensors gguf numpy
fi

M=models/llama-1024x24-v32k-f16
if [ ! -f $M/model.safetensors ]; then
  mkdir -p models
  "$NODE" synth --arch llama --hidden 1024 --layers 24 --heads 16 --kv-heads 8 \
    --intermediate 2816 --vocab 32000 --dtype f16 --out $M
fi
[ -f $M.gguf ] || hfvenv/bin/python "$HERE/to_gguf.py" $M $M.gguf
echo "peers ready under $P"
