#!/usr/bin/env bash
# Build the deployment's images with podman and no container registry: the base images come from Debian packages
# (debootstrap + `podman import`), Python packages and pool sources from scripts/prepare_image_context.sh.
#   scripts/build_images.sh [TARGET...]   targets of docker/Dockerfile: postgres s3 dagster code-location (default
#                                         all), tagged as docker/docker-compose.yaml names them
#   env VARIANT        cpu (default) or cuda, for the code location
#   env PYTHON_IMAGE   base of the Python images (default: localhost/groupmates-base/python:3.11-bookworm, made
#                      here); with a registry e.g. python:3.11-slim-bookworm
#   env DEBIAN_IMAGE   base of the s3 and postgres images (default: localhost/groupmates-base/debian:bookworm)
#   env DEBIAN_MIRROR  the archive debootstrap reads (default http://deb.debian.org/debian)
#   env NO_CACHE=1     rebuild every layer (the wheelhouse and the bases are still reused)
#   env MIN_FREE_GB    refuse to start with less free disk than this (default 8) where podman keeps images or
#                      stages layers: a build that runs out of space half-way fails with a less clear error
# Podman runs with the project's docker/containers.conf (CONTAINERS_CONF), so nothing under /etc changes. Layers are
# cached: a rebuild after a code change redoes only the layers from the project's code on.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$REPO_ROOT/docker/containers.conf}"
VARIANT="${VARIANT:-cpu}"
PYTHON_IMAGE="${PYTHON_IMAGE:-localhost/groupmates-base/python:3.11-bookworm}"
DEBIAN_IMAGE="${DEBIAN_IMAGE:-localhost/groupmates-base/debian:bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TARGETS=("$@")
BUILD_LABEL="io.groupmates-assets.built-by=scripts/build_images.sh"
((${#TARGETS[@]})) || TARGETS=(postgres s3 dagster code-location)

log() { printf 'build_images: %s\n' "$*"; }

image_of() {  # the tag docker/docker-compose.yaml gives each target
    case "$1" in
        postgres) echo "localhost/groupmates-assets/postgres:15" ;;
        s3) echo "localhost/groupmates-assets/s3:latest" ;;
        dagster) echo "localhost/groupmates-assets/dagster:latest" ;;
        code-location) echo "localhost/groupmates-assets/code-location:$VARIANT" ;;
        *) log "ERROR: unknown target '$1' (postgres, s3, dagster, code-location)" >&2; return 1 ;;
    esac
}

# A minimal Debian bookworm (debootstrap's minbase) with PACKAGES, imported as IMAGE; apt caches, lists and docs
# removed. Made once; delete the image to make it again.
debian_base() {
    local image="$1" packages="$2" root
    if podman image exists "$image"; then
        return 0
    fi
    command -v debootstrap >/dev/null || { log "ERROR: debootstrap is missing: run scripts/deploy_tools.sh" >&2; return 1; }
    root="$(mktemp -d)"
    log "making $image from Debian packages (debootstrap minbase${packages:+ + $packages})"
    debootstrap --variant=minbase ${packages:+--include="$packages"} bookworm "$root" "$DEBIAN_MIRROR" >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
        "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log
    tar -C "$root" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
    rm -rf "$root"
}

# Free space (GB) on the filesystem holding $1 (or its nearest existing parent).
free_gb() {
    local dir="$1"
    while [[ ! -d "$dir" ]]; do dir="$(dirname "$dir")"; done
    df -Pk "$dir" | awk 'NR == 2 {printf "%d", $4 / 1048576}'
}

check_free_space() {
    local need="${MIN_FREE_GB:-8}" dir free
    for dir in "$(podman info --format '{{.Store.GraphRoot}}')" "${TMPDIR:-/var/tmp}" "$REPO_ROOT/.groupmates"; do
        free="$(free_gb "$dir")"
        if ((free < need)); then
            log "ERROR: $dir has $free GB free; building the images needs about $need GB (the code location's" \
                "layers are staged and committed there). Free some space (e.g. \`podman image prune\`) or set" \
                "MIN_FREE_GB to build anyway." >&2
            return 1
        fi
    done
}

command -v podman >/dev/null || { log "ERROR: podman is missing: run scripts/deploy_tools.sh" >&2; exit 1; }
check_free_space

wants_python=0
for target in "${TARGETS[@]}"; do
    image_of "$target" >/dev/null
    [[ "$target" == dagster || "$target" == code-location || "$target" == s3 ]] && wants_python=1
done

if ((wants_python)); then
    VARIANT="$VARIANT" bash "$REPO_ROOT/scripts/prepare_image_context.sh"
fi
[[ "$PYTHON_IMAGE" != localhost/groupmates-base/* ]] || ((!wants_python)) ||
    debian_base "$PYTHON_IMAGE" "python3,python3-venv,ca-certificates"
[[ "$DEBIAN_IMAGE" != localhost/groupmates-base/* ]] || debian_base "$DEBIAN_IMAGE" ""
# The build bind-mounts these folders; they must exist even for the images that do not use them.
mkdir -p "$REPO_ROOT/.groupmates/images/wheels/$VARIANT" "$REPO_ROOT/.groupmates/images/sources" \
    "$REPO_ROOT/.groupmates/images/debs"

for target in "${TARGETS[@]}"; do
    image="$(image_of "$target")"
    started=$SECONDS
    podman build --quiet --layers ${NO_CACHE:+--no-cache} --file "$REPO_ROOT/docker/Dockerfile" \
        --ignorefile "$REPO_ROOT/docker/Dockerfile.dockerignore" --target "$target" \
        --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" \
        --build-arg VARIANT="$VARIANT" --label "$BUILD_LABEL" --tag "$image" "$REPO_ROOT" >/dev/null
    log "$image: $(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}'), built in $((SECONDS - started)) s"
done
# A rebuilt tag leaves its previous image untagged; remove those of this project (never anybody else's images).
podman image prune --force --filter "label=$BUILD_LABEL" >/dev/null
