#!/usr/bin/env bash
# Headless Chromium for the register page's tests (e2e/tests/register.rs):
# Debian's `chromium` package, installed when missing. Part of `make test`.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
SUDO=
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
echo "[chromium] installing Debian's chromium for the register page's tests"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
chromium --version
