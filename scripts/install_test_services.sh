#!/usr/bin/env bash
# Install the Debian packages of the services that the test suite starts by itself (idempotent: installs only what
# is missing), with apt-get as root or through sudo:
#   postgresql  initdb/postgres for a throwaway PostgreSQL cluster (groupmates_assets_tests/test_deployment.py);
#               the server binaries land in /usr/lib/postgresql/<version>/bin, where the test looks for them
#   chromium    a headless browser for the UI test: Debian's package `chromium`; Ubuntu's is `chromium-browser`
#               (the test finds either binary, or the one $GROUPMATES_CHROMIUM names)
# Only the test services: `make demo` installs nothing system-wide.
set -euo pipefail

log() { printf 'install_test_services: %s\n' "$*"; }

# The first of the names with an installation candidate in the apt lists (Debian's name when none has one yet).
chromium_package() {
    local name
    for name in chromium chromium-browser; do
        if apt-cache policy "$name" 2>/dev/null | grep -q 'Candidate: [^(]'; then
            printf '%s' "$name"
            return
        fi
    done
    printf 'chromium'
}

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    APT_PACKAGES=(postgresql)
else
    APT_PACKAGES=(postgresql "$(chromium_package)")
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/apt_packages.sh
source "$REPO_ROOT/scripts/apt_packages.sh"
install_apt_packages "the tests that start these services" "${APT_PACKAGES[@]}"
