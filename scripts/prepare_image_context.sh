#!/usr/bin/env bash
# Prepare on the host what the images of docker/Dockerfile install, so that building them downloads nothing:
#   .groupmates/images/wheels/<variant>/  a wheelhouse of requirements.lock (`pip wheel`: the wheels as published,
#                                         sdists built here); cpu: torch's CPU build; cuda: PyPI's torch with its
#                                         CUDA libraries and GPU faiss (docker/image_requirements.py). Built once
#                                         per lock into the user's cache (GROUPMATES_WHEELHOUSE_CACHE, default
#                                         ~/.cache/groupmates-assets/wheelhouse/<variant>-<lock hash>), so a
#                                         fresh clone or a CI job that keeps ~/.cache reuses it; linked from there
#   .groupmates/images/requirements-<variant>.txt  what the code-location image installs from the wheelhouse
#   .groupmates/images/sources/           the embedded pool's source cache, as scripts/fetch_pool_sources.sh
#                                         leaves it (hard links where possible)
#   .groupmates/images/debs/              the .debs of the pool's Debian packages when that script installed
#                                         them on this system (the image registers them with dpkg); else empty
# Idempotent: a wheelhouse complete for the current lock is reused.
#   env VARIANT          cpu (default) or cuda
#   env PYTHON           interpreter whose pip builds the wheelhouse (default .venv/bin/python); Python 3.11,
#                        the images' version
#   env GROUPMATES_WHEELHOUSE_CACHE  where the wheelhouses are kept (default ~/.cache/groupmates-assets/wheelhouse)
#   env TORCH_CPU_INDEX  where torch's CPU build is found when no configured index or find-links has it
#                        (default PyTorch's CPU index)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VARIANT="${VARIANT:-cpu}"
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
CONTEXT="$REPO_ROOT/.groupmates/images"
WHEELS="$CONTEXT/wheels/$VARIANT"
SOURCE_CACHE="${GROUPMATES_SOURCE_CACHE:-$REPO_ROOT/.groupmates/sources}"

log() { printf 'prepare_image_context: %s\n' "$*"; }

case "$VARIANT" in cpu | cuda) ;; *) log "ERROR: VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 1 ;; esac
if ! "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
    log "ERROR: $PYTHON is not Python 3.11 (the images' Python); set PYTHON=/path/to/python3.11" >&2
    exit 1
fi

# --- the wheelhouse
requirements_of_variant() {
    local torch
    torch="$(grep -E '^torch==' "$REPO_ROOT/requirements.lock")"
    grep -vE '^(torch|faiss-cpu)==' "$REPO_ROOT/requirements.lock"
    if [[ "$VARIANT" == cpu ]]; then
        echo "${torch%%+*}+cpu"
        grep -E '^faiss-cpu==' "$REPO_ROOT/requirements.lock"
    else
        echo "$torch"
        "$PYTHON" "$REPO_ROOT/docker/image_requirements.py" cuda "$REPO_ROOT/pyproject.toml" | grep -E '^faiss'
    fi
}

lock_hash="$(cat "$REPO_ROOT/requirements.lock" "$REPO_ROOT/pyproject.toml" | sha256sum | cut -c1-12)"
CACHED="${GROUPMATES_WHEELHOUSE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/groupmates-assets/wheelhouse}/$VARIANT-$lock_hash"
stamp="$CACHED/.complete"
if [[ -e "$stamp" ]]; then
    log "wheelhouse up to date: $CACHED"
else
    # A new lock: a wheelhouse of its own, holding only what it names.
    rm -rf "$CACHED"
    mkdir -p "$CACHED"
    requirements="$(mktemp)"
    trap 'rm -f "$requirements"' EXIT
    requirements_of_variant > "$requirements"
    extra=()
    if [[ "$VARIANT" == cpu ]] && ! "$PYTHON" -m pip download --quiet --no-deps -d "$CACHED" \
        "$(grep -E '^torch==' "$requirements")" 2>/dev/null; then
        log "torch's CPU build is not on the configured indexes; using $TORCH_CPU_INDEX"
        extra=(--extra-index-url "$TORCH_CPU_INDEX")
    fi
    log "building the $VARIANT wheelhouse from requirements.lock into $CACHED"
    "$PYTHON" -m pip wheel --quiet "${extra[@]}" -r "$requirements" -w "$CACHED"
    touch "$stamp"
    log "wheelhouse ready: $(find "$CACHED" -name '*.whl' | wc -l) wheels, $(du -sh "$CACHED" | cut -f1)"
fi
# Into the build context: hard links where the cache shares the file system, else a copy.
rm -rf "$WHEELS"
mkdir -p "$(dirname "$WHEELS")"
cp -al "$CACHED" "$WHEELS" 2>/dev/null || cp -a "$CACHED" "$WHEELS"

# --- what the code-location image installs from it: pyproject.toml's runtime requirements for the variant
"$PYTHON" "$REPO_ROOT/docker/image_requirements.py" "$VARIANT" "$REPO_ROOT/pyproject.toml" \
    > "$CONTEXT/requirements-$VARIANT.txt"

# --- the embedded pool's sources
PYTHON="$PYTHON" bash "$REPO_ROOT/scripts/fetch_pool_sources.sh"
rm -rf "$CONTEXT/sources" "$CONTEXT/debs"
mkdir -p "$CONTEXT/debs"
cp -al "$SOURCE_CACHE" "$CONTEXT/sources" 2>/dev/null || cp -a "$SOURCE_CACHE" "$CONTEXT/sources"
# The default encoder extracted here (in the cache's own layout), not in the image's last layer.
"$PYTHON" -c 'import sys; from groupmates_assets.lib.influence.encoder import default_encoder_dir
default_encoder_dir(sys.argv[1])' "$CONTEXT/sources"
chmod -R a+rX "$CONTEXT/sources"
log "source cache: $(du -sh "$CONTEXT/sources" | cut -f1) from $SOURCE_CACHE"

# The pool's packages and what they plainly depend on (python3-doc and postgresql-doc are metapackages: the text is
# in python3.11-doc and postgresql-doc-15); alternatives such as dict-server are left out.
mapfile -t pool_packages < <("$PYTHON" -c '
from groupmates_assets.lib.embedded_pool.sources import APT_PACKAGES
print("\n".join(APT_PACKAGES))' 2>/dev/null || true)
system_packages=("${pool_packages[@]}")
if ((${#pool_packages[@]})); then
    mapfile -t -O "${#system_packages[@]}" system_packages < <(apt-cache depends "${pool_packages[@]}" 2>/dev/null |
        sed -n 's/^  Depends: \([^<][^ ]*\)$/\1/p' | sort -u)
fi
installed=()
for package in "${system_packages[@]}"; do
    version="$(dpkg-query -W -f '${Status} ${Version}' "$package" 2>/dev/null || true)"
    if [[ "$version" == "install ok installed "* ]]; then
        installed+=("$package=${version##* }")
    fi
done
if ((${#installed[@]})); then
    (cd "$CONTEXT/debs" && apt-get -o APT::Sandbox::User=root download "${installed[@]}" >/dev/null)
    log "Debian packages the pool reads from the system: ${installed[*]}"
fi
log "image context ready in $CONTEXT"
