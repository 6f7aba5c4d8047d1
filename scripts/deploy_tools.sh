#!/usr/bin/env bash
# Install what building and running the deployment's images takes, from the Debian archive (idempotent: installs
# only what is missing), with apt-get as root or through sudo:
#   podman, buildah, runc  build and run OCI images without a daemon (runc: crun cannot set the host's rlimits
#                          in every sandbox; docker/containers.conf selects runc)
#   netavark, aardvark-dns per-project networks where the service names resolve (the compose network);
#                          iptables: the firewall rules netavark sets up for them
#   catatonit              the init that `init: true` runs as PID 1 (forwards signals, reaps zombies)
#   podman-compose         `podman-compose -f docker/docker-compose.yaml up`, as `docker compose` does
#   debootstrap            the Debian base images when no container registry is reachable (scripts/build_images.sh)
# Nothing under /etc is changed: the project's own docker/containers.conf is passed through CONTAINERS_CONF.
set -euo pipefail

APT_PACKAGES=(podman buildah runc netavark aardvark-dns iptables catatonit podman-compose debootstrap)

log() { printf 'deploy_tools: %s\n' "$*"; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/apt_packages.sh
source "$REPO_ROOT/scripts/apt_packages.sh"
install_apt_packages "building and running the deployment's images" "${APT_PACKAGES[@]}"
