#!/usr/bin/env bash
# The container images, built without a daemon (buildah and podman from
# Debian's packages, vfs storage, chroot isolation, runc):
#
#   images/build.sh build        copyhold and the CPU copyhold-node (`make images`)
#   images/build.sh build-cuda   the CUDA copyhold-node too (`make images-cuda`)
#   images/build.sh check        run each built image read-only as UID 65532:
#                                --version and its health endpoint
#   images/build.sh archive IMG  write IMG as a docker-archive (for `ctr import`),
#                                print its path
#   images/build.sh base         only resolve (or build) the base image, print it
#   images/build.sh tags         print the image references it builds
#   images/build.sh tool CMD…    run CMD (buildah, podman, skopeo) with these settings
#
# The binaries are built here, outside the images (`cargo build --profile
# release-image`), and copied in. The Containerfiles name distroless's
# public `cc-debian12` base; where no public registry answers (or with
# COPYHOLD_BASE_SOURCE=local) an equivalent base is built from Debian's own
# packages (glibc, libgcc, libstdc++, CA certificates, netbase; no shell) and
# the images are built FROM it.
#
# Environment: COPYHOLD_CACHE (~/.cache/copyhold), CARGO_TARGET_DIR,
# COPYHOLD_BASE_SOURCE (auto | public | local; default auto),
# COPYHOLD_IMAGE_REGISTRY (default ghcr.io/copyhold), COPYHOLD_IMAGES_PREBUILT=1
# (use the binaries already built in $CARGO_TARGET_DIR/release-image).
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${COPYHOLD_CACHE:-$HOME/.cache/copyhold}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$CACHE/images
# Settings every buildah/podman/skopeo call here shares: vfs storage (no
# overlay mounts needed), runc (crun refuses hybrid cgroups), no default
# ulimits (setting RLIMIT_NPROC inside is refused on some machines).
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/images/containers/containers.conf}
export CONTAINERS_STORAGE_CONF=${CONTAINERS_STORAGE_CONF:-$WORK/storage.conf}
if [ ! -f "$CONTAINERS_STORAGE_CONF" ]; then
  mkdir -p "$(dirname "$CONTAINERS_STORAGE_CONF")"
  if [ "$(id -u)" = 0 ]; then
    printf '[storage]\ndriver = "vfs"\nrunroot = "/run/containers/storage"\ngraphroot = "/var/lib/containers/storage"\n'
  else
    printf '[storage]\ndriver = "vfs"\nrunroot = "%s"\ngraphroot = "%s"\n' \
      "${XDG_RUNTIME_DIR:-/tmp/containers-$(id -u)}/containers" "$HOME/.local/share/containers/storage"
  fi >"$CONTAINERS_STORAGE_CONF"
fi
export BUILDAH_ISOLATION=chroot
REGISTRY=${COPYHOLD_IMAGE_REGISTRY:-ghcr.io/copyhold}
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml")
PUBLIC_BASE=gcr.io/distroless/cc-debian12:nonroot
LOCAL_BASE=localhost/copyhold/base-cc:debian12
BASE_SOURCE=${COPYHOLD_BASE_SOURCE:-auto}
# PyPI's NVIDIA wheels for the CUDA image: 12.x (12.9 update 1), the last
# major whose NVRTC still targets sm_60/61/70.
NVRTC_PIN=nvidia-cuda-nvrtc-cu12==12.9.86
CUBLAS_PIN=nvidia-cublas-cu12==12.9.1.4
RUNTIME_PIN=nvidia-cuda-runtime-cu12==12.9.79

IMG_COPYHOLD=$REGISTRY/copyhold:$VERSION
IMG_NODE_CPU=$REGISTRY/copyhold-node:$VERSION-cpu
IMG_NODE_CUDA=$REGISTRY/copyhold-node:$VERSION

log() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] ERROR: %s\n' "$*" >&2; exit 1; }

need_tools() {
  local missing=() t
  for t in buildah podman skopeo runc; do command -v "$t" >/dev/null || missing+=("$t"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}: apt-get install buildah podman skopeo runc"
  log "installing buildah, podman, skopeo, runc (Debian's packages)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah podman skopeo runc >/dev/null
}

revision() {
  local r
  r=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
  if [ "$r" != unknown ] && ! git -C "$ROOT" diff --quiet HEAD 2>/dev/null; then r="$r-dirty"; fi
  echo "$r"
}

build_binaries() {
  if [ "${COPYHOLD_IMAGES_PREBUILT:-0}" = 1 ]; then
    log "using the binaries already in $TARGET/release-image (COPYHOLD_IMAGES_PREBUILT=1)"
  else
    log "building copyhold and copyhold-node (cargo --profile release-image; first time: several minutes)"
    (cd "$ROOT" && cargo build -q --locked --profile release-image -p copyhold -p copyhold-node \
      --bin copyhold --bin copyhold-node)
  fi
  rm -rf "$WORK/context/bin" && mkdir -p "$WORK/context/bin"
  cp "$TARGET/release-image/copyhold" "$TARGET/release-image/copyhold-node" "$WORK/context/bin/"
}

# ------------------------------------------------------------------ base ----

# A base equivalent to distroless/cc-debian12 from Debian's packages,
# unpacked (no maintainer scripts, no shell): glibc, libgcc_s, libstdc++, CA
# certificates, /etc/services, /etc/os-release, and the users root and
# nonroot (65532) with their home folders.
build_local_base() {
  local tmp root
  tmp=$(mktemp -d) root=$tmp/rootfs
  mkdir -p "$root" "$tmp/debs"
  (cd "$tmp/debs" && apt-get download -q libc6 libgcc-s1 libstdc++6 ca-certificates netbase base-files >/dev/null 2>&1) ||
    { apt-get update -qq >/dev/null && (cd "$tmp/debs" && apt-get download -q libc6 libgcc-s1 libstdc++6 ca-certificates netbase base-files >/dev/null); }
  local d
  for d in "$tmp"/debs/*.deb; do dpkg-deb -x "$d" "$root"; done
  # What a binary never needs at run time: glibc's tools and charset modules,
  # documentation, and everything in ca-certificates but the bundle.
  rm -rf "$root"/usr/share/{doc,man,info,lintian,locale,i18n,common-licenses,base-files} \
    "$root"/usr/bin "$root"/usr/sbin "$root"/sbin "$root"/usr/libexec \
    "$root"/usr/lib/x86_64-linux-gnu/gconv "$root"/usr/share/gcc "$root"/etc/update-motd.d
  mkdir -p "$root"/etc/ssl/certs "$root"/tmp "$root"/home/nonroot "$root"/root "$root"/var/cache
  # The bundle update-ca-certificates would write: every Mozilla certificate.
  cat "$root"/usr/share/ca-certificates/mozilla/*.crt >"$root"/etc/ssl/certs/ca-certificates.crt
  rm -rf "$root"/usr/share/ca-certificates "$root"/usr/sbin
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root"/etc/passwd
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$root"/etc/group
  chmod 1777 "$root"/tmp
  chown 65532:65532 "$root"/home/nonroot
  chmod 700 "$root"/root
  tar --numeric-owner -C "$root" -cf "$tmp/rootfs.tar" .
  local c
  c=$(buildah from scratch)
  buildah add "$c" "$tmp/rootfs.tar" / >/dev/null
  buildah config --env PATH=/usr/local/bin:/usr/bin:/bin --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --user 65532:65532 --workingdir /home/nonroot \
    --label org.opencontainers.image.description="glibc, libgcc, libstdc++, CA certificates from Debian 12's packages (as distroless/cc-debian12)" \
    "$c"
  buildah commit -q --rm "$c" "$LOCAL_BASE" >/dev/null
  rm -rf "$tmp"
}

have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# The base to build FROM: the public one when a registry answers (or it is
# already here), else one built from Debian's packages.
resolve_base() {
  case "$BASE_SOURCE" in
    public) echo "$PUBLIC_BASE"; return ;;
    local) ;;
    auto)
      if have_image "$PUBLIC_BASE" || timeout 20 skopeo inspect --retry-times 0 "docker://$PUBLIC_BASE" >/dev/null 2>&1; then
        echo "$PUBLIC_BASE"; return
      fi
      log "no public registry answers for $PUBLIC_BASE: using a base built from Debian's packages" ;;
    *) die "COPYHOLD_BASE_SOURCE must be auto, public or local (got $BASE_SOURCE)" ;;
  esac
  if ! have_image "$LOCAL_BASE"; then
    log "building $LOCAL_BASE from Debian's packages"
    build_local_base
  fi
  echo "$LOCAL_BASE"
}

# ------------------------------------------------------------------ cuda ----

wheel_file() {
  local pin=$1 dist ver
  dist=${pin%%==*} ver=${pin##*==}
  ls "$CACHE/wheels/${dist//-/_}-$ver-"*.whl 2>/dev/null | head -n1
}

# cuda/lib64, cuda/include and cuda/LICENSES of the build context, from the
# pinned wheels (downloaded once into $CACHE/wheels).
cuda_context() {
  mkdir -p "$CACHE/wheels"
  local pin missing=()
  for pin in "$NVRTC_PIN" "$CUBLAS_PIN" "$RUNTIME_PIN"; do [ -n "$(wheel_file "$pin")" ] || missing+=("$pin"); done
  if [ ${#missing[@]} -gt 0 ]; then
    log "downloading ${missing[*]} from PyPI (cuBLAS: about 600 MB)"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$CACHE/wheels" "${missing[@]}"
  fi
  local out=$WORK/context/cuda
  rm -rf "$out" && mkdir -p "$out/lib64" "$out/include" "$out/LICENSES"
  python3 - "$out" "$(wheel_file "$NVRTC_PIN")" "$(wheel_file "$CUBLAS_PIN")" "$(wheel_file "$RUNTIME_PIN")" <<'PY'
import os, re, shutil, sys, zipfile
out, wheels = sys.argv[1], sys.argv[2:]
for w in wheels:
    with zipfile.ZipFile(w) as z:
        for n in z.namelist():
            base = os.path.basename(n)
            if re.search(r"/lib/lib(nvrtc|nvrtc-builtins|cublas|cublasLt)\.so", n):
                dest = os.path.join(out, "lib64", base)
            elif "/cuda_runtime/include/" in n and base.endswith((".h", ".hpp")):
                dest = os.path.join(out, "include", n.split("/cuda_runtime/include/", 1)[1])
            elif ".dist-info/" in n and base.lower() in ("license.txt", "licence.txt"):
                dest = os.path.join(out, "LICENSES", n.split("/")[0].split("-")[0] + ".txt")
            else:
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(n) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
PY
  # cudarc opens libX.so.12; the wheels ship exactly those names.
  [ -f "$out/lib64/libnvrtc.so.12" ] && [ -f "$out/lib64/libcublas.so.12" ] && [ -f "$out/lib64/libcublasLt.so.12" ] &&
    [ -f "$out/include/cuda_fp16.h" ] || die "the CUDA wheels did not give libnvrtc.so.12, libcublas(Lt).so.12 and cuda_fp16.h"
}

# ----------------------------------------------------------------- build ----

build_one() {
  local file=$1 tag=$2 base=$3
  log "building $tag (from $base)"
  buildah build -q --layers=false --format oci -f "$ROOT/images/$file" \
    --build-arg BASE="$base" --build-arg VERSION="$VERSION" --build-arg REVISION="$(revision)" \
    -t "$tag" "$WORK/context" >/dev/null
}

# Compressed size: the gzip'd layers a registry would store (the image saved
# as a tar, gzip'd), in MB.
sizes() {
  local img goal gz raw
  printf '%-48s %12s %12s %8s\n' IMAGE UNCOMPRESSED COMPRESSED GOAL
  while read -r img goal; do
    raw=$(podman image inspect --format '{{.Size}}' "$img")
    gz=$(podman save --format docker-archive "$img" 2>/dev/null | gzip -6 -c | wc -c)
    printf '%-48s %9.1f MB %9.1f MB %8s' "$img" "$(echo "$raw/1000000" | bc -l)" "$(echo "$gz/1000000" | bc -l)" "$goal"
    if [ "$goal" != - ] && [ "$gz" -gt $((${goal% MB} * 1000000)) ]; then printf '  OVER GOAL'; fi
    printf '\n'
  done
}

cmd_build() {
  local cuda=$1
  need_tools
  build_binaries
  [ "$cuda" = 1 ] && cuda_context
  local base
  base=$(resolve_base)
  build_one copyhold.Containerfile "$IMG_COPYHOLD" "$base"
  build_one copyhold-node.Containerfile "$IMG_NODE_CPU" "$base"
  [ "$cuda" = 1 ] && build_one copyhold-node-cuda.Containerfile "$IMG_NODE_CUDA" "$base"
  log "built (base $base):"
  {
    echo "$IMG_COPYHOLD 40 MB"
    echo "$IMG_NODE_CPU 80 MB"
    if [ "$cuda" = 1 ]; then echo "$IMG_NODE_CUDA -"; fi
  } | sizes
}

# archive IMG: a docker-archive of IMG named IMG (what `ctr images import`
# needs: an oci-archive without a ref name imports nothing), rewritten only
# when the image changed.
cmd_archive() {
  local img=$1 id file
  id=$(podman image inspect --format '{{.Id}}' "$img")
  file=$WORK/archives/${id:0:16}.tar
  mkdir -p "$WORK/archives"
  if [ ! -s "$file" ]; then
    rm -f "$file.tmp"
    buildah push -q "$img" "docker-archive:$file.tmp:$img" >/dev/null
    mv "$file.tmp" "$file"
  fi
  echo "$file"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# How the chart runs the images: read-only root, UID/GID 65532, no
# capabilities, no new privileges.
RO=(--read-only --user 65532:65532 --cap-drop=ALL --security-opt no-new-privileges)

wait_http() {
  local url=$1 i
  for i in $(seq 1 120); do curl -fsS "$url" 2>/dev/null && return 0; sleep 0.5; done
  return 1
}

# Each image: --version, then its server started and its health endpoint
# asked from the host (host network, loopback only).
cmd_check() {
  local fixture=${COPYHOLD_FIXTURE_MODEL:-}
  [ -n "$fixture" ] || die "set COPYHOLD_FIXTURE_MODEL to a model folder for the node's health check"
  local kc=${KUBECONFIG:-}
  [ -n "$kc" ] || die "set KUBECONFIG (the gateway's health check lists from the API server)"
  local img port name tmp
  tmp=$(mktemp -d)
  # The container's user must read the kubeconfig: a copy only it uses.
  install -m 0644 "$kc" "$tmp/kubeconfig"
  for img in "$IMG_COPYHOLD" "$IMG_NODE_CPU" $(have_image "$IMG_NODE_CUDA" && echo "$IMG_NODE_CUDA"); do
    echo "\$ podman run --rm --read-only --user 65532:65532 --network none $img --version"
    podman run --rm "${RO[@]}" --network none "$img" --version
  done
  port=$(free_port) name=copyhold-check-$$
  echo "\$ podman run -d --read-only --user 65532:65532 --network host -v KUBECONFIG:/kubeconfig:ro $IMG_COPYHOLD gateway --listen 127.0.0.1:$port; curl /healthz /readyz"
  podman run -d --name "$name" "${RO[@]}" \
    --network host -e KUBECONFIG=/kubeconfig -e POD_NAME=check -e POD_NAMESPACE=default \
    -v "$tmp/kubeconfig:/kubeconfig:ro" "$IMG_COPYHOLD" gateway --listen "127.0.0.1:$port" >/dev/null
  if wait_http "http://127.0.0.1:$port/healthz"; then echo; curl -fsS "http://127.0.0.1:$port/readyz"; echo; else podman logs "$name" | tail -n 20; podman rm -f "$name" >/dev/null; die "gateway not healthy"; fi
  podman rm -f "$name" >/dev/null
  port=$(free_port)
  echo "\$ podman run -d --read-only --user 65532:65532 --network host -v MODEL:/models:ro --tmpfs /tmp $IMG_NODE_CPU serve --model /models --device cpu --port $port; curl /health"
  podman run -d --name "$name" "${RO[@]}" \
    --network host -v "$fixture:/models:ro" "$IMG_NODE_CPU" \
    serve --model /models --host 127.0.0.1 --port "$port" --device cpu --served-model-name check >/dev/null
  if wait_http "http://127.0.0.1:$port/health"; then echo; else podman logs "$name" | tail -n 20; podman rm -f "$name" >/dev/null; die "node not healthy"; fi
  podman rm -f "$name" >/dev/null
  if have_image "$IMG_NODE_CUDA"; then
    # No GPU needed: NVRTC from the image compiles every kernel for sm_60…sm_90.
    echo "\$ podman run --rm --read-only --user 65532:65532 --network none $IMG_NODE_CUDA cuda-check"
    podman run --rm "${RO[@]}" --network none "$IMG_NODE_CUDA" cuda-check
  fi
  rm -rf "$tmp"
}

case "${1:-}" in
  build) cmd_build 0 ;;
  build-cuda) cmd_build 1 ;;
  check) cmd_check ;;
  archive) shift; cmd_archive "$1" ;;
  base) need_tools; resolve_base ;;
  tool) shift; exec "$@" ;;
  tags) printf '%s\n' "$IMG_COPYHOLD" "$IMG_NODE_CPU" "$IMG_NODE_CUDA" ;;
  *) echo "usage: $0 build|build-cuda|check|archive IMG|base|tags|tool CMD…" >&2; exit 2 ;;
esac
