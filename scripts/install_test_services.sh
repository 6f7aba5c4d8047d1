#!/usr/bin/env bash
# Install the Debian packages of the services that the test suite starts by itself (idempotent: installs only what
# is missing), with apt-get as root or through sudo:
#   postgresql  initdb/postgres for a throwaway PostgreSQL cluster (groupmates_assets_tests/test_deployment.py);
#               the server binaries land in /usr/lib/postgresql/<version>/bin, where the test looks for them
#   chromium    a headless browser for the UI test
set -euo pipefail

APT_PACKAGES=(postgresql chromium)

log() { printf 'install_test_services: %s\n' "$*"; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/apt_packages.sh
source "$REPO_ROOT/scripts/apt_packages.sh"
install_apt_packages "the tests that start these services" "${APT_PACKAGES[@]}"
