# copyhold: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
export COPYHOLD_CACHE ?= $(HOME)/.cache/copyhold
# One build cache for the demo, the tests and CI, whatever the checkout.
export CARGO_TARGET_DIR ?= $(COPYHOLD_CACHE)/target

.PHONY: all build test lint demo demo-down crds cluster-up cluster-down images images-cuda images-check node-up node-down

all: build

build:
	$(CARGO) build --workspace --release

## Regenerate crds/ from the Rust types.
crds:
	$(CARGO) run -q -p copyhold -- crdgen --out crds
	cp crds/*.yaml charts/copyhold/crds/

## Everything: formatting, lints, unit tests, tests against a real API server.
## Starts the local control plane if no cluster is reachable through
## KUBECONFIG, and stops it again afterwards if it started it.
test: lint cuda-check
	@started=0; \
	if [ -z "$${KUBECONFIG:-}" ] && ! e2e/cluster.sh status 2>/dev/null | grep -q 'API server ready'; then started=1; fi; \
	e2e/cluster.sh up; \
	trap 'if [ $$started = 1 ]; then e2e/cluster.sh down; fi' EXIT; \
	e2e/chromium-install.sh; \
	e2e/faketime-install.sh; \
	e2e/openai-check.sh; \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) nextest run --workspace --no-fail-fast; \
	else \
	  $(CARGO) test --workspace --no-fail-fast; \
	fi

## Every CUDA kernel compiled for sm_60…sm_90 with NVRTC 12.x (no GPU needed).
.PHONY: cuda-check
cuda-check:
	inference-node/cuda-check.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## The main job: a local control plane with the simulated GPU fleet, the
## CRDs and the examples applied. Leaves it running; `make demo-down` stops it.
demo:
	@e2e/demo.sh

demo-down:
	@if e2e/node.sh can-run >/dev/null; then e2e/node.sh down; fi
	e2e/cluster.sh down

## Container images without a daemon (buildah/podman, vfs, runc): copyhold and
## the CPU copyhold-node, from a release build without debug info; prints the
## sizes. With no public registry reachable the base is built from Debian's
## packages. See docs/install.md.
images:
	images/build.sh build

## Also the CUDA copyhold-node (NVRTC and cuBLAS 12 from PyPI's wheels, about
## 1 GB unpacked): optional, slow to build and to move.
images-cuda:
	images/build.sh build-cuda

## Each built image run with a read-only root as UID 65532: --version, and
## the gateway's /healthz and the node's /health (the fixture model).
images-check:
	@e2e/cluster.sh up
	@eval "$$(e2e/cluster.sh env)"; kubectl apply -f crds/ >/dev/null; COPYHOLD_FIXTURE_MODEL=$${COPYHOLD_FIXTURE_MODEL:-$(CURDIR)/tests/fixtures/tiny-llama} images/build.sh check

## A real node (kubelet, containerd, runc, kube-proxy) joined to the local
## control plane, with the built images loaded (needs root). See e2e/node.sh.
node-up:
	e2e/cluster.sh up
	e2e/node.sh up

node-down:
	e2e/node.sh down

cluster-up:
	e2e/cluster.sh up

cluster-down:
	e2e/cluster.sh down
