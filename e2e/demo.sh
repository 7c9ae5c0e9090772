#!/usr/bin/env bash
# `make demo`: the main job on one machine with no cluster.
#   a real control plane (etcd, kube-apiserver, controller-manager, scheduler)
#   with a simulated fleet of reused GPUs → copyhold's CRDs → `helm install`
#   of charts/copyhold: the controller and gateway Pods → the examples'
#   energy budget and members' stints → a synthesized small model as a
#   ModelDeployment → placed by the controller, bound by the real scheduler →
#   `copyhold-node serve` → requests from two members through the gateway,
#   answered, metered in the StintQuota's register. Leaves everything
#   running; `make demo-down` stops it.
#
# Where the Pods run:
#   real node  (root and runc: `e2e/node.sh can-run`): the images of
#              `make images` as containers on a real kubelet with containerd
#              and kube-proxy (e2e/node.sh); the gateway is reached on its
#              Service's ClusterIP.
#   stand-in   (otherwise, or COPYHOLD_DEMO_NODE=standin): the kubelet
#              stand-in runs each Pod's command as a local process on its
#              own loopback address.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
CACHE=${COPYHOLD_CACHE:-$HOME/.cache/copyhold}
RUN=${COPYHOLD_RUN:-$CACHE/run}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
NS=copyhold-demo
SYS=copyhold-system
REAL_NODE=copyhold-real-node
say() { printf '\n==> %s\n' "$*"; }
t0=$(date +%s)

MODE=real
if [ "${COPYHOLD_DEMO_NODE:-}" = standin ]; then
  MODE=standin
  echo "==> the Pods run under the kubelet stand-in as local processes: COPYHOLD_DEMO_NODE=standin"
elif why=$(e2e/node.sh can-run); then
  echo "==> the Pods run as containers on a real node (kubelet, containerd, runc, kube-proxy): this machine can run containers"
else
  MODE=standin
  echo "==> the Pods run under the kubelet stand-in as local processes: no real node here ($why)"
fi

if [ $MODE = real ]; then
  say "building the images (copyhold, copyhold-node; first time: the release build, several minutes)"
  images/build.sh build
  BIN=$TARGET/release-image
else
  say "building copyhold, copyhold-node and the kubelet stand-in (first time: several minutes)"
  cargo build -q -p copyhold -p copyhold-node -p copyhold-e2e --bins
  BIN=$TARGET/debug
fi

say "starting the control plane (first time on a machine builds Kubernetes 1.20: about 7 min)"
e2e/cluster.sh up
eval "$(e2e/cluster.sh env)"

say "installing the CRDs (generated from the Rust types)"
kubectl apply --server-side --force-conflicts --field-manager=copyhold-demo -f crds/ >/dev/null
kubectl wait --for=condition=Established --timeout=60s -f crds/ >/dev/null

say "the simulated fleet"
kubectl get nodes -L nvidia.com/gpu.product -L nvidia.com/gpu.count -L nvidia.com/gpu.memory

MODEL=$CACHE/demo-model
if [ ! -f "$MODEL/config.json" ]; then
  say "synthesizing a small Llama-shaped model (random weights) into $MODEL"
  "$BIN/copyhold-node" synth --arch llama --hidden 256 --layers 4 --heads 8 --kv-heads 4 \
    --intermediate 688 --vocab 512 --dtype f16 --out "$MODEL" >/dev/null
fi

if [ $MODE = real ]; then
  say "starting the real node $REAL_NODE (first time builds the kubelet and kube-proxy: about 6 min) and loading the images"
  e2e/node.sh up
  mapfile -t TAGS < <(images/build.sh tags)
  e2e/node.sh load "${TAGS[0]}" "${TAGS[1]}"
  # The node lends its CPU to placement as one accelerator with GPU Feature
  # Discovery's labels; the engine serves it with --device cpu.
  kubectl label node $REAL_NODE --overwrite nvidia.com/gpu.present=true nvidia.com/gpu.product=Real-Node-CPU \
    nvidia.com/gpu.memory=16384 nvidia.com/gpu.count=1 nvidia.com/gpu.compute.major=8 nvidia.com/gpu.compute.minor=0 >/dev/null
  kubectl patch node $REAL_NODE --subresource=status --type=merge -p '{"status":{"capacity":{"nvidia.com/gpu":"1"},"allocatable":{"nvidia.com/gpu":"1"}}}' >/dev/null
  kubectl get nodes -o wide
else
  say "the simulated fleet"
  kubectl get nodes -L nvidia.com/gpu.product -L nvidia.com/gpu.count -L nvidia.com/gpu.memory
fi
for n in $SYS $NS; do kubectl create namespace "$n" --dry-run=client -o yaml | kubectl apply -f - >/dev/null; done

MODEL=$CACHE/demo-model
if [ ! -f "$MODEL/config.json" ]; then
  say "synthesizing a small Llama-shaped model (random weights) into $MODEL"
  "$BIN/copyhold-node" synth --arch llama --hidden 256 --layers 4 --heads 8 --kv-heads 4 \
    --intermediate 688 --vocab 512 --dtype f16 --out "$MODEL" >/dev/null
fi
chmod -R a+rX "$MODEL"

# Processes of an older demo go first.
for p in demo-controller demo-kubelet demo-gateway; do
  if [ -f "$RUN/$p.pid" ] && kill -0 "$(cat "$RUN/$p.pid")" 2>/dev/null; then kill "$(cat "$RUN/$p.pid")" || true; sleep 2; fi
  rm -f "$RUN/$p.pid"
done
HELM_ARGS=()
if [ $MODE = real ]; then
  TOL='[{"key":"nvidia.com/gpu","operator":"Exists","effect":"NoSchedule"}]'
  SEL='{"copyhold.dev/real-node":"true"}'
  HELM_ARGS=(--set image.repository="${TAGS[0]%:*}" --set image.tag="${TAGS[0]##*:}" --set image.pullPolicy=Never
    --set controller.engineImages.copyhold="${TAGS[1]}"
    --set-json "controller.nodeSelector=$SEL" --set-json "gateway.nodeSelector=$SEL"
    --set-json "controller.tolerations=$TOL" --set-json "gateway.tolerations=$TOL")
else
  say "starting the kubelet stand-in: it runs the Pods of $SYS and $NS as local processes (logs in $RUN/logs/pods)"
  mkdir -p "$RUN/logs"
  # The node's image first: the other is a prefix of it.
  setsid "$BIN/copyhold-kubelet" --namespace "$SYS,$NS" --ip-prefix 127.0.100 \
    --image "ghcr.io/copyhold/copyhold-node=$BIN/copyhold-node" --image "ghcr.io/copyhold/copyhold=$BIN/copyhold" \
    --log-dir "$RUN/logs/pods" >"$RUN/logs/demo-kubelet.log" 2>&1 </dev/null &
  echo $! >"$RUN/demo-kubelet.pid"
fi

say "helm install copyhold (a controller with a standby, two gateway replicas; waits until their Pods are Ready)"
e2e/cluster.sh tools >/dev/null
HELM=$CACHE/bin/helm
"$HELM" upgrade --install copyhold charts/copyhold -n $SYS --wait --timeout 240s \
  --set controller.watchNamespace=$NS --set gateway.watchNamespace=$NS \
  --set controller.nodeDevice=cpu --set controller.budgetSelector=copyhold.dev/demo=true \
  --set controller.nodeAdminTokenSecret=copyhold-node-admin \
  --set dashboards.enabled=true "${HELM_ARGS[@]}" | sed -n '/^NOTES:/,$p' | sed 's/^/    /'
kubectl get pods -n $SYS -o wide

say "checking the examples as the operator will, then applying the energy budget and the members' stints"
"$BIN/copyhold" validate examples/*.yaml
kubectl apply -f examples/energy-budget.yaml
# This install reconciles only the budgets labelled for it (budgets are cluster-wide).
kubectl label energybudget rooftop-solar copyhold.dev/demo=true --overwrite >/dev/null
kubectl apply -n $NS -f examples/stint-quota.yaml
# The nodes' admin token (power limits), mounted into every copyhold-node Pod.
kubectl get secret copyhold-node-admin -n $NS >/dev/null 2>&1 ||
  kubectl create secret generic copyhold-node-admin -n $NS --from-literal=token="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" >/dev/null

say "deploying the model"
if [ $MODE = real ]; then
  # The controller runs in a container that does not see the model's
  # hostPath: the model's sizing is given inline.
  PLACEMENT="{nodeSelector: {copyhold.dev/real-node: \"true\"}}"
  SIZING="sizing: {weightBytes: \"$(stat -c %s "$MODEL/model.safetensors")\", dtype: f16, numLayers: 4, numKvHeads: 4, headDim: 32}"
else
  # The co-op's old P4 serves the demo, leaving the rest of the fleet to the tests.
  PLACEMENT="{gpuProducts: [Tesla-P4]}"
  SIZING=""
fi
cat <<EOF | kubectl apply -n $NS -f -
apiVersion: copyhold.dev/v1alpha1
kind: ModelDeployment
metadata: {name: demo-llama}
spec:
  model:
    source: {hostPath: {path: $MODEL}}
    servedName: demo-llama
    $SIZING
  serving: {contextLength: 1024, maxConcurrentSequences: 4}
  placement: $PLACEMENT
  replicas: 1
  priority: deferrable
  stintQuota: coop-members
EOF
printf '    waiting for the model to be placed and loaded'
for _ in $(seq 1 120); do
  state=$(kubectl get md demo-llama -n $NS -o jsonpath='{.status.state}' 2>/dev/null || true)
  [ "$state" = Ready ] && break
  printf '.'
  sleep 1
done
echo
kubectl get md -n $NS
kubectl describe md demo-llama -n $NS | sed -n '/^Events:/,$p'
ip=$(kubectl get pods -n $NS -l copyhold.dev/model-deployment=demo-llama -o jsonpath='{.items[0].status.podIP}')
node=$(kubectl get pods -n $NS -l copyhold.dev/model-deployment=demo-llama -o jsonpath='{.items[0].spec.nodeName}')
[ -n "$ip" ] || { echo "the model did not come up; see $RUN/logs"; exit 1; }

if [ $MODE = real ]; then
  # kube-proxy's rules take the Service's ClusterIP to a gateway container.
  gw_ip=$(kubectl get service copyhold-gateway -n $SYS -o jsonpath='{.spec.clusterIP}')
  via="Service's ClusterIP"
else
  # No kube-proxy here: the gateway Service is reached on one of its Pods.
  gw_ip=$(kubectl get pods -n $SYS -l app.kubernetes.io/component=gateway -o jsonpath='{.items[0].status.podIP}')
  via="Service's Pod"
fi
GW=http://$gw_ip:8080
for _ in $(seq 1 60); do curl -sf "$GW/readyz" >/dev/null && break; sleep 0.5; done

say "asking the model through the gateway $via $gw_ip as two members (model Pod $ip on $node)"
ask() {
  local member=$1 key=$2 prompt=$3
  echo "  $member > $prompt"
  curl -sS "$GW/v1/chat/completions" -H "authorization: Bearer $key" -H 'content-type: application/json' \
    -d "{\"model\":\"demo-llama\",\"messages\":[{\"role\":\"user\",\"content\":\"$prompt\"}],\"max_tokens\":16,\"temperature\":0}" |
    python3 -c 'import json,sys; r=json.load(sys.stdin)
if "error" in r: print("  < error:", r["error"]); sys.exit(0)
u=r["usage"]; print("  < %r\n    (random weights: the words mean nothing) tokens: %d prompt + %d completion, energy %.3f J" % (r["choices"][0]["message"]["content"], u["prompt_tokens"], u["completion_tokens"], u.get("energy_joules", 0.0)))'
}
ask bakery example-bakery-key-change-me "What is a stint on a common?"
ask library example-library-key-change-me "Why keep a margin below the solar supply?"
ask library example-library-key-change-me "Who keeps the register?"
echo "  a wrong key gets:"
curl -sS "$GW/v1/chat/completions" -H 'authorization: Bearer not-a-member' -H 'content-type: application/json' \
  -d '{"model":"demo-llama","messages":[{"role":"user","content":"hi"}]}'; echo

say "the register (written by the gateway into the StintQuota's status)"
sleep 1
kubectl get sq -n $NS
kubectl get sq coop-members -n $NS -o jsonpath='{range .status.members[*]}{.name}{"\t"}{.requests}{" requests\t"}{.tokens}{" weighted tokens of "}{.stintTokens}{"\t"}{.energyWh}{" Wh\t"}{.state}{"\n"}{end}' | column -t -s $'\t' | sed 's/^/  /'

say "the node's own power and energy metrics"
curl -sf "http://$ip:8000/metrics" | grep -E '^copyhold_node_(power_watts|energy_joules_total)' || true

say "the energy budget (the controller Pod reads the supply and the nodes' draw, and walks its ladder)"
for _ in $(seq 1 20); do
  [ -n "$(kubectl get eb rooftop-solar -o jsonpath='{.status.drawWatts}' 2>/dev/null)" ] && break
  sleep 0.5
done
kubectl get eb
echo "  nodes without a copyhold-node Pod count at their GPUs' idle power (catalog), never zero:"
echo "  $(kubectl get eb rooftop-solar -o jsonpath='{.status.nodesWithoutReading}')"
echo "  conditions: $(kubectl get eb rooftop-solar -o jsonpath='{range .status.conditions[*]}{.type}={.status} {end}')"
# By day the solar schedule covers the fleet's idle draw and the demo model;
# overnight (battery floor, 150 W) it cannot: say so rather than leave a 503
# unexplained.
if [ "$(kubectl get eb rooftop-solar -o jsonpath='{.status.conditions[?(@.type=="Shedding")].status}')" = True ]; then
  echo "  the budget sheds now: $(kubectl get eb rooftop-solar -o jsonpath='{.status.conditions[?(@.type=="WithinBudget")].message}')"
  echo "  (the schedule in examples/energy-budget.yaml is at its battery floor outside about 09:00-18:00),"
  echo "  so chat requests get 503 with Retry-After until the supply rises. Watch it come back:"
  echo "    kubectl get eb rooftop-solar -w    # or: kubectl delete eb rooftop-solar"
fi

say "ready in $(( $(date +%s) - t0 ))s. Everything keeps running:"
echo "  $(e2e/cluster.sh env | head -n1)"
echo "  the gateway: curl $GW/v1/models -H 'authorization: Bearer example-school-key-change-me'"
echo "  (or the openai client with base_url=$GW/v1 and a member's key)"
echo "  kubectl get md,sq,eb,pods -n $NS -o wide"
echo "  helm status copyhold -n $SYS   (helm: $HELM)"
gw_pod_ip=$(kubectl get pods -n $SYS -l app.kubernetes.io/component=gateway -o jsonpath='{.items[0].status.podIP}')
echo "  gateway metrics (a port of their own, never the API's): curl http://$gw_pod_ip:9090/metrics"
echo "Stop everything with: make demo-down"
