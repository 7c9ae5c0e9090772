#!/usr/bin/env bash
# copyhold-node against llama-bench on the same GGUF files, 2 threads, in
# one run: Q4_K_M, Q8_0, Q4_0 and Q5_K_M of the 284 M synthesized shape and
# of a 1B shape (TinyLlama-1.1B's), all written by our converter
# (`copyhold-node gguf`).
# See bench/results/inference-node-gguf.md.
#
#   bench/gguf.sh                 # the whole table
#   SHAPES=284m TYPES="q4_0 q5_k_m" bench/gguf.sh
#   LOOPS=1 bench/gguf.sh         # also ours with COPYHOLD_QDOT=loops (the
#                                 # path before the intrinsic kernels)
#   BASE=path/to/copyhold-node bench/gguf.sh  # also that build of ours
#                                 # (before a change), in the same run
#
# Per file: `copyhold-node bench --prompt 512 --gen 128` with llama-bench
# (prefill against pp512, decode at positions 512–640 against tg128 -d 512),
# then `--prompt 16` (decode from an empty context against tg128 -d 16).
# Makes what is missing under ${COPYHOLD_PEERS:-~/.cache/copyhold/peers}/models
# first; needs llama-bench from bench/peers/setup.sh and a release
# copyhold-node (COPYHOLD_NODE=path, default $CARGO_TARGET_DIR/release-image).
# Raw output goes to $OUT (default /tmp/copyhold-gguf-bench), the summary to
# stdout.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
P=${COPYHOLD_PEERS:-$HOME/.cache/copyhold/peers}
T=${CARGO_TARGET_DIR:-$HERE/../target}
NODE=${COPYHOLD_NODE:-$T/release-image/copyhold-node}
LB=${LLAMA_BENCH:-$P/llama.cpp/build/bin/llama-bench}
THREADS=${THREADS:-2}
SHAPES=${SHAPES:-284m 1b}
TYPES=${TYPES:-q4_k_m q8_0 q4_0 q5_k_m}
BASE=${BASE:-}
OUT=${OUT:-/tmp/copyhold-gguf-bench}
mkdir -p "$P/models" "$OUT"
[ -x "$NODE" ] || { echo "no copyhold-node at $NODE (COPYHOLD_NODE=...)" >&2; exit 2; }
[ -x "$LB" ] || { echo "no llama-bench at $LB (bench/peers/setup.sh)" >&2; exit 2; }

# name and synth arguments of each shape
shape_args() {
  case $1 in
    284m) echo "llama-1024x24-v32k-f16 --hidden 1024 --layers 24 --heads 16 --kv-heads 8 --intermediate 2816" ;;
    1b) echo "llama-2048x22-v32k-f16 --hidden 2048 --layers 22 --heads 32 --kv-heads 4 --intermediate 5632" ;;
    *) echo "unknown shape $1" >&2; exit 2 ;;
  esac
}

model_file() { # shape type -> path of the GGUF file, made if missing
  local args name dir file
  args=$(shape_args "$1")
  name=${args%% *}
  dir=$P/models/$name
  file=$P/models/${name%-f16}-$2.gguf
  if [ ! -f "$dir/model.safetensors" ] && [ ! -f "$dir/model.safetensors.index.json" ]; then
    # shellcheck disable=SC2086
    "$NODE" synth --arch llama ${args#* } --vocab 32000 --dtype f16 --out "$dir.tmp$$" >&2
    mv -T "$dir.tmp$$" "$dir"
  fi
  if [ ! -f "$file" ]; then # written aside, then renamed: other runs may share the directory
    "$NODE" gguf --from "$dir" --out "$file.tmp$$" --type "$2" >&2
    mv "$file.tmp$$" "$file"
  fi
  echo "$file"
}

echo "# $(date -u +%FT%TZ) $(uname -n), threads $THREADS"
echo "# copyhold-node: $NODE ($(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo "# llama-bench: $LB"
echo "# CPU: $(lscpu | sed -n 's/^Model name: *//p'); $(nproc) CPUs"
echo "# flags (SIMD): $(grep -m1 -o -w -E 'avx2|fma|f16c|avx512[a-z_0-9]*|avx_vnni|amx_[a-z0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
for shape in $SHAPES; do
  for type in $TYPES; do
    f=$(model_file "$shape" "$type")
    for prompt in 512 16; do
      log=$OUT/$shape-$type-p$prompt.log
      echo "## $shape $type prompt $prompt: $NODE bench --model $f --batch 1 --prompt $prompt --gen 128 --threads $THREADS --llama-bench $LB --gguf $f" >&2
      "$NODE" bench --model "$f" --batch 1 --prompt "$prompt" --gen 128 --threads "$THREADS" \
        --llama-bench "$LB" --gguf "$f" >"$log" 2>"$log.err"
      if [ -n "$BASE" ]; then
        "$BASE" bench --model "$f" --batch 1 --prompt "$prompt" --gen 128 \
          --threads "$THREADS" 2>>"$log.err" | grep '^{' | sed 's/"device"/"base":true,"device"/' >>"$log"
      fi
      if [ "${LOOPS:-0}" = 1 ]; then
        COPYHOLD_QDOT=loops "$NODE" bench --model "$f" --batch 1 --prompt "$prompt" --gen 128 \
          --threads "$THREADS" 2>>"$log.err" | grep '^{' | sed 's/"device"/"loops":true,"device"/' >>"$log"
      fi
    done
  done
done
python3 - "$OUT" $SHAPES -- $TYPES <<'EOF'
import json, sys, os
out = sys.argv[1]
rest = sys.argv[2:]
shapes, types = rest[:rest.index('--')], rest[rest.index('--') + 1:]
def rows(path):
    ours, loops, base, ll = None, None, None, {}
    for line in open(path):
        if not line.startswith('{'):
            continue
        v = json.loads(line)
        if 'device' in v:
            if v.get('loops'):
                loops = v
            elif v.get('base'):
                base = v
            else:
                ours = v
        elif v.get('engine', '').startswith('llama.cpp'):
            ll['pp' if 'empty' in v['note'] else 'tgd'] = v
    return ours, loops, base, ll
print('| model | type | ours prefill tok/s (pp512) | llama.cpp pp512 | ratio | ours decode @512–640 | llama.cpp tg128 -d 512 | ratio | ours decode @16–144 | llama.cpp tg128 -d 16 | ratio | loops prefill / decode@512 / decode@16 | base prefill / decode@512 / decode@16 |')
print('| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |')
for s in shapes:
    for t in types:
        p5 = os.path.join(out, f'{s}-{t}-p512.log')
        p16 = os.path.join(out, f'{s}-{t}-p16.log')
        if not (os.path.exists(p5) and os.path.exists(p16)):
            continue
        o5, l5, b5, ll5 = rows(p5)
        o16, l16, b16, ll16 = rows(p16)
        def r(a, b):
            return f'{a / b:.2f}×' if a and b else '–'
        pp, tgd = ll5['pp']['prefill_tokens_per_s'], ll5['tgd']['decode_tokens_per_s']
        tg16 = ll16['tgd']['decode_tokens_per_s']
        def three(a5, a16):
            if not (a5 and a16):
                return '–'
            return f"{a5['prefill_tokens_per_s']:.1f} / {a5['decode_tokens_per_s']:.2f} / {a16['decode_tokens_per_s']:.2f}"
        loops, base = three(l5, l16), three(b5, b16)
        print(f"| {s} | {t} | {o5['prefill_tokens_per_s']:.1f} | {pp:.1f} | {r(o5['prefill_tokens_per_s'], pp)} "
              f"| {o5['decode_tokens_per_s']:.2f} | {tgd:.2f} | {r(o5['decode_tokens_per_s'], tgd)} "
              f"| {o16['decode_tokens_per_s']:.2f} | {tg16:.2f} | {r(o16['decode_tokens_per_s'], tg16)} | {loops} | {base} |")
EOF
