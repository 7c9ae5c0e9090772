#!/usr/bin/env bash
# The inference node through the official `openai` Python client, as users
# call it: streaming and not, chat and completions, seeds, stop strings,
# usage and energy consistent with /metrics; then issue 20's API (tool
# calls, structured output, logprobs, n, stop, errors). Part of `make test`.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CACHE=${COPYHOLD_CACHE:-$HOME/.cache/copyhold}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
VENV=$CACHE/venv
if ! "$VENV/bin/python" -c 'import openai, jsonschema' 2>/dev/null; then
  echo "[openai-check] installing the openai client and jsonschema into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q openai jsonschema
fi
cargo build -q -p copyhold-node --bin copyhold-node
MODEL=$CACHE/openai-check-model
if [ ! -f "$MODEL/config.json" ]; then
  "$TARGET/debug/copyhold-node" synth --arch llama --hidden 128 --layers 2 --heads 4 --kv-heads 2 \
    --intermediate 344 --vocab 512 --dtype f16 --out "$MODEL" >/dev/null
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$TARGET/debug/copyhold-node" serve --model "$MODEL" --host 127.0.0.1 --port "$port" >"$CACHE/openai-check-node.log" 2>&1 &
node=$!
trap 'kill $node 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 0.25
done
"$VENV/bin/python" inference-node/tests/python/openai_client.py "http://127.0.0.1:$port"
"$VENV/bin/python" inference-node/tests/python/openai_api.py "http://127.0.0.1:$port"
