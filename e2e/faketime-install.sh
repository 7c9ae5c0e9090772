#!/usr/bin/env bash
# libfaketime for the gateway's chaos test (e2e/tests/gateway.rs): replicas
# run with clocks skewed by up to 5 s. Debian's `faketime` package,
# installed when missing. Part of `make test`.
set -euo pipefail
LIB=/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1
if [ -f "$LIB" ]; then
  exit 0
fi
SUDO=
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
echo "[faketime] installing Debian's faketime for the gateway's chaos test"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq faketime >/dev/null
ls "$LIB"
