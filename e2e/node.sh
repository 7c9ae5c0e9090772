#!/usr/bin/env bash
# A real Kubernetes node on this machine, joined to the local control plane
# (e2e/cluster.sh): the kubelet and kube-proxy built from the same Debian
# kubernetes source as the API server, Debian's containerd, runc and CNI
# plugins (bridge + host-local), a pause image built here, and copyhold's
# images (`make images`) loaded into containerd. Pods on it are real
# containers in their own network namespaces; Services work through
# kube-proxy (iptables).
#
#   e2e/node.sh up        install + build what is missing, start, wait until Ready
#   e2e/node.sh down      stop it and remove what it set up (processes, Pods'
#                         containers and mounts, iptables chains, the bridge)
#   e2e/node.sh status    say what runs
#   e2e/node.sh can-run   exit 0 when this machine can run the node, else
#                         print why not (one line) and exit 1
#   e2e/node.sh load IMG… import images from podman/buildah storage into the node
#   e2e/node.sh deps      only install Debian's packages and build the binaries
#
# The node is named $COPYHOLD_NODE_NAME (default copyhold-real-node), labelled
# copyhold.dev/real-node=true and tainted nvidia.com/gpu=real-node:NoSchedule:
# nothing of the simulated fleet's tests lands there by chance (their
# controller and gateway Pods do not tolerate the taint, and it advertises no
# GPUs unless a test gives it some), while the inference Pods the controller
# makes tolerate nvidia.com/gpu as on any GPU node.
#
# Needs root (containers, network namespaces, iptables). Everything it builds
# is cached under ~/.cache/copyhold (binaries, pause, containerd's images).
set -Eeuo pipefail
NODE_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The control plane's variables and helpers (build_k8s_bins, apt_install, step, start…).
# shellcheck source=cluster.sh
source "$NODE_HERE/cluster.sh"
log() { printf '[node] %s\n' "$*" >&2; }
die() { printf '[node] ERROR: %s\n' "$*" >&2; exit 1; }

NODE_NAME=${COPYHOLD_NODE_NAME:-copyhold-real-node}
NODE_BIN=$CACHE/k8s-$K8S_VERSION/node-bin
NODE_CACHE=$CACHE/node
NODE_RUN=$RUN/node
# containerd's own socket and state (not the machine's /run/containerd).
CTRD_STATE=/run/copyhold-node/containerd
CTRD_SOCK=/run/copyhold-node/containerd.sock
POD_CIDR=${COPYHOLD_NODE_POD_CIDR:-10.244.7.0/24}
POD_GW=${POD_CIDR%.*}.1
BRIDGE=copyhold0
CNI_NET=copyhold-node
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
PAUSE_IMAGE=localhost/copyhold/pause:1
NODE_LABEL=copyhold.dev/real-node
NODE_TAINT=nvidia.com/gpu=real-node:NoSchedule
# Our own nat chains (removed by `down` with the KUBE-* ones).
API_CHAIN=COPYHOLD-NODE-API
KUBELET_CHAIN=COPYHOLD-NODE-KUBELET
OWN_CHAINS='COPYHOLD-NODE-'
export CONTAINERS_CONF=${CONTAINERS_CONF:-$NODE_HERE/../images/containers/containers.conf}

ctr_() { ctr --address "$CTRD_SOCK" -n k8s.io "$@"; }
kc() { KUBECONFIG=$KUBECONFIG_FILE kubectl "$@"; }

# ------------------------------------------------------------ can-run ----

cmd_can_run() {
  if [ "$(id -u)" != 0 ]; then echo "not root: a real node needs root (containers, network namespaces, iptables)"; return 1; fi
  if ! command -v runc >/dev/null; then echo "runc is not installed (apt-get install runc; e2e/node.sh deps installs it)"; return 1; fi
  if ! runc --version >/dev/null 2>&1; then echo "runc does not run: $(runc --version 2>&1 | head -n1)"; return 1; fi
  if [ ! -d /sys/fs/cgroup ]; then echo "no cgroup filesystem at /sys/fs/cgroup"; return 1; fi
  return 0
}

# ---------------------------------------------------------------- deps ----

build_pause() {
  mkdir -p "$NODE_CACHE/pause"
  gcc -static -Os -s -o "$NODE_CACHE/pause/pause" "$NODE_HERE/node/pause.c"
  cp "$NODE_HERE/node/pause.Containerfile" "$NODE_CACHE/pause/Containerfile"
  "$NODE_HERE/../images/build.sh" tool buildah build -q --layers=false --format oci \
    -t "$PAUSE_IMAGE" -f "$NODE_CACHE/pause/Containerfile" "$NODE_CACHE/pause" >/dev/null
}

cmd_deps() {
  mkdir -p "$LOGS" "$NODE_CACHE"
  step "apt packages (containerd, runc, CNI plugins, iptables, buildah, podman)" "$LOGS/node-apt.log" \
    apt_install containerd runc containernetworking-plugins iptables conntrack buildah podman skopeo gcc libc6-dev \
    golang-go rsync golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
  if [ ! -x "$NODE_BIN/kubelet" ] || [ ! -x "$NODE_BIN/kube-proxy" ]; then
    step "deb-src entry for bookworm" "$LOGS/deb-src.log" ensure_deb_src
    log "building the kubelet and kube-proxy $K8S_VERSION from Debian's source (about 6 min on 2 cores, once per machine)"
    step "build kubelet, kube-proxy" "$LOGS/build-node.log" \
      build_k8s_bins "$CACHE/src-node" "$NODE_BIN" kubelet kube-proxy
  fi
  if [ ! -x "$NODE_CACHE/pause/pause" ] || ! "$NODE_HERE/../images/build.sh" tool buildah inspect --type image "$PAUSE_IMAGE" >/dev/null 2>&1; then
    step "pause image (static, FROM scratch)" "$LOGS/node-pause.log" build_pause
  fi
}

# ------------------------------------------------------------------ up ----

write_containerd_config() {
  mkdir -p "$NODE_RUN/cni" "$NODE_CACHE/containerd" "$CTRD_STATE"
  cat >"$NODE_RUN/containerd.toml" <<EOF
version = 2
root = "$NODE_CACHE/containerd"
state = "$CTRD_STATE"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$CTRD_SOCK"
[ttrpc]
  address = ""
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Without it every Pod sandbox fails here: "runc create failed: unable to
  # start container process: can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_RUN/cni"
    max_conf_num = 1
EOF
  # No masquerading: Pods talk only to each other and to this machine.
  cat >"$NODE_RUN/cni/10-copyhold-node.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "$CNI_NET",
  "plugins": [
    {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GW"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

api_port() { sed -n 's#.*server: https://127.0.0.1:\([0-9]*\).*#\1#p' "$KUBECONFIG_FILE"; }

# The bridge, made before the kubelet starts: its gateway address is the
# node's InternalIP (the kubelet refuses a loopback node IP, and the API
# server dials the node's address for exec, logs and port-forward). The CNI
# bridge plugin takes the bridge as it finds it.
make_bridge() {
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip -4 addr show dev "$BRIDGE" | grep -q "inet $POD_GW/" || ip addr add "$POD_GW/${POD_CIDR#*/}" dev "$BRIDGE"
  ip link set "$BRIDGE" up
}

# nat_chain TABLE-HOOK CHAIN RULE…: CHAIN holds exactly RULE, jumped to first from HOOK.
nat_chain() {
  local hook=$1 chain=$2; shift 2
  iptables -t nat -N "$chain" 2>/dev/null || iptables -t nat -F "$chain"
  iptables -t nat -A "$chain" "$@"
  iptables -t nat -D "$hook" -j "$chain" 2>/dev/null || true
  iptables -t nat -I "$hook" 1 -j "$chain"
}

# Two address mappings, because the local control plane and the kubelet
# listen on loopback only (nothing of them is exposed on the machine's
# network):
# - Pods reach the API server as every Pod does, through the `kubernetes`
#   Service (10.96.0.1:443), whose endpoint is this machine's address and
#   the API server's port. For traffic from the Pod network (only that),
#   the Service's address goes to the loopback listener, ahead of
#   kube-proxy's rules; route_localnet lets the bridge deliver to and answer
#   from 127.0.0.1.
# - The API server dials the node's InternalIP (the bridge's gateway) on
#   10250: from this machine only, that goes to the kubelet on 127.0.0.1.
route_loopback_listeners() {
  local port=$1
  remember_sysctl net.ipv4.conf.all.route_localnet
  sysctl -qw net.ipv4.conf.all.route_localnet=1
  nat_chain PREROUTING "$API_CHAIN" -s "$POD_CIDR" -d "$API_SERVICE_IP/32" -p tcp --dport 443 \
    -j DNAT --to-destination "127.0.0.1:$port"
  nat_chain OUTPUT "$KUBELET_CHAIN" -d "$POD_GW/32" -p tcp --dport 10250 -j DNAT --to-destination 127.0.0.1:10250
}

# Sysctls the node changes, with their values before, restored by `down`.
remember_sysctl() {
  local key=$1
  grep -q "^$key=" "$NODE_RUN/sysctl.orig" 2>/dev/null || echo "$key=$(sysctl -n "$key")" >>"$NODE_RUN/sysctl.orig"
}

# kube-proxy's jump from PREROUTING (it carries a comment, so -C cannot name it).
kube_proxy_hooked() { iptables -t nat -S PREROUTING | grep -- '-j KUBE-SERVICES' >/dev/null; }

node_ready() {
  [ "$(kc get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

containerd_ready() { ctr --address "$CTRD_SOCK" version >/dev/null 2>&1; }

cmd_up() {
  local why
  why=$(cmd_can_run) || die "$why"
  cmd_deps
  [ -f "$KUBECONFIG_FILE" ] || die "no local control plane: run e2e/cluster.sh up first"
  api_ready || die "the local control plane does not answer: run e2e/cluster.sh up first"
  mkdir -p "$NODE_RUN"
  if pid_alive "$RUN/node-kubelet.pid" && pid_alive "$RUN/node-containerd.pid" && pid_alive "$RUN/node-kube-proxy.pid" && node_ready; then
    log "node $NODE_NAME already running"
    return 0
  fi
  stop_node_processes
  trap 'stop_node_processes; die "start-up failed; logs in $LOGS (node-*.log)"' ERR
  write_containerd_config
  remember_sysctl net.ipv4.ip_forward
  # kube-proxy turns route_localnet on at start: remember it before that.
  remember_sysctl net.ipv4.conf.all.route_localnet
  # The bridge plugin turns forwarding on for its gateway; say so by doing it here.
  sysctl -qw net.ipv4.ip_forward=1

  log "starting containerd (socket $CTRD_SOCK)"
  start node-containerd containerd --config "$NODE_RUN/containerd.toml"
  wait_for containerd 30 "$LOGS/node-containerd.log" containerd_ready || die "containerd did not start; log: $LOGS/node-containerd.log"
  log "loading the pause image and copyhold's images into containerd"
  load_images "$PAUSE_IMAGE" $(loadable_copyhold_images)

  local port
  port=$(api_port)
  make_bridge
  log "starting the kubelet as $NODE_NAME"
  mkdir -p "$NODE_RUN/kubelet" "$NODE_RUN/pki" "$NODE_RUN/volume-plugins"
  start node-kubelet "$NODE_BIN/kubelet" --kubeconfig="$KUBECONFIG_FILE" \
    --container-runtime=remote --container-runtime-endpoint="unix://$CTRD_SOCK" \
    --pod-infra-container-image="$PAUSE_IMAGE" \
    --cgroup-driver=cgroupfs --cgroups-per-qos=false --enforce-node-allocatable= \
    --fail-swap-on=false --eviction-hard= --image-gc-high-threshold=100 --read-only-port=0 \
    --address=127.0.0.1 --node-ip="$POD_GW" --hostname-override="$NODE_NAME" \
    --root-dir="$NODE_RUN/kubelet" --cert-dir="$NODE_RUN/pki" --volume-plugin-dir="$NODE_RUN/volume-plugins" \
    --node-labels="$NODE_LABEL=true" --register-with-taints="$NODE_TAINT" \
    --healthz-bind-address=127.0.0.1 --v=2
  log "starting kube-proxy (iptables)"
  start node-kube-proxy "$NODE_BIN/kube-proxy" --kubeconfig="$KUBECONFIG_FILE" --proxy-mode=iptables \
    --hostname-override="$NODE_NAME" --cluster-cidr="$POD_CIDR" --bind-address=127.0.0.1 \
    --healthz-bind-address=127.0.0.1:10256 --metrics-bind-address=127.0.0.1:10249 \
    --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 --conntrack-tcp-timeout-close-wait=0 --v=2

  # Our mapping of the `kubernetes` Service must come before kube-proxy's
  # jump in PREROUTING (kube-proxy prepends its own once, and keeps it).
  wait_for "kube-proxy's rules" 60 "$LOGS/node-kube-proxy.log" kube_proxy_hooked ||
    die "kube-proxy wrote no rules; log: $LOGS/node-kube-proxy.log"
  route_loopback_listeners "$port"
  wait_for "node Ready" 120 "$LOGS/node-kubelet.log" node_ready ||
    die "node $NODE_NAME did not become Ready; log: $LOGS/node-kubelet.log"
  # No node-lifecycle controller runs: lift the taint admission put on the
  # new Node ourselves, keeping ours.
  kc taint node "$NODE_NAME" node.kubernetes.io/not-ready:NoSchedule- >/dev/null 2>&1 || true
  pid_alive "$RUN/node-kube-proxy.pid" || die "kube-proxy exited; log: $LOGS/node-kube-proxy.log"
  trap - ERR
  log "node $NODE_NAME Ready (Pods on $POD_CIDR, bridge $BRIDGE)"
}

# copyhold's images that exist in podman/buildah storage (built by `make images`).
loadable_copyhold_images() {
  local img
  for img in $("$NODE_HERE/../images/build.sh" tags); do
    if "$NODE_HERE/../images/build.sh" tool podman image exists "$img" 2>/dev/null; then echo "$img"; fi
  done
}

# load_images IMG…: each image from podman/buildah storage into containerd,
# through a docker-archive that names it (an oci-archive without a ref name
# imports nothing, silently). Archives are cached by image id.
load_images() {
  local img file
  for img in "$@"; do
    file=$("$NODE_HERE/../images/build.sh" archive "$img")
    ctr_ images import "$file" >/dev/null
    # grep reads all of it: with -q, ctr could die of SIGPIPE under pipefail.
    ctr_ images ls -q | grep -x "$img" >/dev/null || die "containerd did not import $img from $file"
    log "loaded $img"
  done
}

cmd_load() {
  containerd_ready || die "the node is not running (e2e/node.sh up)"
  load_images "$@"
}

# ---------------------------------------------------------------- down ----

stop_node_processes() {
  local name
  for name in node-kube-proxy node-kubelet node-containerd; do stop_pid_file "$RUN/$name.pid"; done
}

# Every container and sandbox containerd still runs, stopped and removed.
remove_containers() {
  containerd_ready || return 0
  local t
  for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; done
  sleep 1
  for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$t" >/dev/null 2>&1 || true; done
  for t in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$t" >/dev/null 2>&1 || true; done
}

# Chains named KUBE-* in each table (the kubelet's and kube-proxy's), their
# jumps from the built-in chains first.
remove_kube_chains() {
  local cmd table chain rule
  for cmd in iptables ip6tables; do
    command -v "$cmd" >/dev/null || continue
    for table in nat filter mangle; do
      "$cmd" -t "$table" -S 2>/dev/null | grep -E '^-A (PREROUTING|INPUT|FORWARD|OUTPUT|POSTROUTING) .*-j (KUBE-|'"$OWN_CHAINS"')' |
        while read -r rule; do
          # shellcheck disable=SC2086
          "$cmd" -t "$table" ${rule/-A /-D } 2>/dev/null || true
        done || true
      for chain in $("$cmd" -t "$table" -S 2>/dev/null | awk '/^-N (KUBE-|'"$OWN_CHAINS"')/{print $2}'); do
        "$cmd" -t "$table" -F "$chain" 2>/dev/null || true
      done
      for chain in $("$cmd" -t "$table" -S 2>/dev/null | awk '/^-N (KUBE-|'"$OWN_CHAINS"')/{print $2}'); do
        "$cmd" -t "$table" -X "$chain" 2>/dev/null || true
      done
    done
  done
}

# Mounts left below the node's folders (Pods' volumes, sandboxes' shm), deepest first.
unmount_below() {
  local dir=$1 m
  [ -d "$dir" ] || return 0
  for m in $(awk -v d="$dir" '$2 == d || index($2, d "/") == 1 {print $2}' /proc/self/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}

cmd_down() {
  if [ -f "$KUBECONFIG_FILE" ] && api_ready && pid_alive "$RUN/node-kubelet.pid"; then
    # Let the kubelet stop its Pods properly (volumes unmounted, network
    # torn down); the Node goes so nothing is scheduled there any more.
    kc cordon "$NODE_NAME" >/dev/null 2>&1 || true
    kc delete pods -A --field-selector "spec.nodeName=$NODE_NAME" --grace-period=5 --wait=true --timeout=60s >/dev/null 2>&1 || true
  fi
  stop_pid_file "$RUN/node-kube-proxy.pid"
  stop_pid_file "$RUN/node-kubelet.pid"
  remove_containers
  stop_pid_file "$RUN/node-containerd.pid"
  if [ -f "$KUBECONFIG_FILE" ] && api_ready; then
    kc delete pods -A --field-selector "spec.nodeName=$NODE_NAME" --grace-period=0 --force >/dev/null 2>&1 || true
    kc delete node "$NODE_NAME" --wait=false >/dev/null 2>&1 || true
  fi
  if [ -x "$NODE_BIN/kube-proxy" ]; then "$NODE_BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true; fi
  remove_kube_chains
  unmount_below "$NODE_RUN/kubelet"
  unmount_below "$CTRD_STATE"
  unmount_below /run/copyhold-node
  # Pods' network namespaces that containerd made, and the CNI's leases.
  local ns
  for ns in /run/netns/cni-*; do
    [ -e "$ns" ] || continue
    umount "$ns" 2>/dev/null || true
    rm -f "$ns"
  done
  rm -rf "/var/lib/cni/networks/$CNI_NET" "/var/lib/cni/results/$CNI_NET"-* 2>/dev/null || true
  ip link show "$BRIDGE" >/dev/null 2>&1 && ip link delete "$BRIDGE" || true
  if [ -f "$NODE_RUN/sysctl.orig" ]; then
    local kv
    while read -r kv; do sysctl -qw "$kv" || true; done <"$NODE_RUN/sysctl.orig"
    rm -f "$NODE_RUN/sysctl.orig"
  fi
  rm -rf "$NODE_RUN/kubelet" "$NODE_RUN/pki" /run/copyhold-node
  log "stopped and cleaned up (cached: $NODE_BIN, $NODE_CACHE)"
}

cmd_status() {
  local name
  for name in node-containerd node-kubelet node-kube-proxy; do
    if pid_alive "$RUN/$name.pid"; then echo "$name running (pid $(cat "$RUN/$name.pid"))"; else echo "$name stopped"; fi
  done
  if [ -f "$KUBECONFIG_FILE" ] && node_ready; then echo "node $NODE_NAME Ready"; else echo "node $NODE_NAME not Ready"; fi
}

case "${1:-}" in
  up) lock; cmd_up ;;
  down) lock; cmd_down ;;
  status) cmd_status ;;
  can-run) cmd_can_run ;;
  load) shift; cmd_load "$@" ;;
  deps) cmd_deps ;;
  *) echo "usage: $0 up|down|status|can-run|load IMG…|deps" >&2; exit 2 ;;
esac
