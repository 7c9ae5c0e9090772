#!/usr/bin/env bash
# `make demo`: bring up the local control plane with the simulated fleet of
# reused GPUs, install copyhold's CRDs, apply the examples and show them.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '\n==> %s\n' "$*"; }
t0=$(date +%s)

say "building copyhold (cargo, first time takes a few minutes)"
cargo build -q -p copyhold
say "starting the control plane (first time on a machine builds Kubernetes 1.20: about 7 min)"
e2e/cluster.sh up
eval "$(e2e/cluster.sh env)"

say "installing the CRDs (generated from the Rust types)"
kubectl apply --server-side --field-manager=copyhold-demo -f crds/ >/dev/null
kubectl wait --for=condition=Established --timeout=60s -f crds/ >/dev/null

say "the simulated fleet"
kubectl get nodes -L nvidia.com/gpu.product -L nvidia.com/gpu.count -L nvidia.com/gpu.memory

say "checking the examples as the operator will"
cargo run -q -p copyhold -- validate examples/*.yaml

say "applying the examples"
kubectl create namespace copyhold-demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply -n copyhold-demo -f examples/
kubectl get md,sq -n copyhold-demo
kubectl get eb

say "an invalid manifest is refused with a message naming the field"
kubectl apply -f tests/invalid/eb-margin-over-100.yaml 2>&1 || true

say "ready in $(( $(date +%s) - t0 ))s. Try:"
echo "  $(e2e/cluster.sh env | head -n1)"
echo "  kubectl explain modeldeployment.spec"
echo "  kubectl get copyhold -A"
echo "Stop everything with: make demo-down"
