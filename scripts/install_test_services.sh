#!/usr/bin/env bash
# Install the Debian packages of the services that the test suite starts by itself (idempotent: installs only what
# is missing), with apt-get as root or through sudo:
#   postgresql  initdb/postgres for a throwaway PostgreSQL cluster (groupmates_assets_tests/test_deployment.py);
#               the server binaries land in /usr/lib/postgresql/<version>/bin, where the test looks for them
#   chromium    a headless browser for the UI test
set -euo pipefail

APT_PACKAGES=(postgresql chromium)

log() { printf 'install_test_services: %s\n' "$*"; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! command -v dpkg-query >/dev/null 2>&1 ||
        [[ "$(dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null || true)" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]} == 0)); then
    log "apt packages already installed: ${APT_PACKAGES[*]}"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    log "ERROR: apt-get is not available, so these Debian packages cannot be installed: ${missing[*]}" >&2
    log "the tests that start these services need a Debian/Ubuntu system (or image) with: ${APT_PACKAGES[*]}" >&2
    exit 1
fi
SUDO=()
if [[ "$(id -u)" != 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
        log "ERROR: not root and sudo is missing; as root run:" >&2
        log "  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
        exit 1
    fi
    SUDO=(sudo)
fi
log "installing apt packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
shopt -s nullglob
lists=(/var/lib/apt/lists/*_Packages*)
shopt -u nullglob
if ((${#lists[@]} == 0)); then
    log "no apt package lists yet; running apt-get update"
    "${SUDO[@]}" apt-get update
fi
if ! "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"; then
    log "install failed with the current package lists; running apt-get update first"
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi
log "installed: ${missing[*]}"
