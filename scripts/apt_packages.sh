# Sourced by the setup scripts: install the Debian packages that are missing, with apt-get as root or via sudo.
#   install_apt_packages "<what needs them>" PACKAGE...
# The caller defines log(). Idempotent: does nothing when every package is installed.

install_apt_packages() {
    local purpose="$1"
    shift
    local wanted=("$@") missing=() pkg
    for pkg in "${wanted[@]}"; do
        if ! command -v dpkg-query >/dev/null 2>&1 ||
            [[ "$(dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null || true)" != "install ok installed" ]]; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        log "apt packages already installed: ${wanted[*]}"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        log "ERROR: apt-get is not available, so these Debian packages cannot be installed: ${missing[*]}" >&2
        log "$purpose needs a Debian/Ubuntu system (or image) with: ${wanted[*]}" >&2
        return 1
    fi
    local sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        if ! command -v sudo >/dev/null 2>&1; then
            log "ERROR: not root and sudo is missing; as root run:" >&2
            log "  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
            return 1
        fi
        sudo=(sudo)
    fi
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local lists
    shopt -s nullglob
    lists=(/var/lib/apt/lists/*_Packages*)
    shopt -u nullglob
    if ((${#lists[@]} == 0)); then
        log "no apt package lists yet; running apt-get update"
        "${sudo[@]}" apt-get update
    fi
    if ! "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"; then
        log "install failed with the current package lists; running apt-get update first"
        "${sudo[@]}" apt-get update
        "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
    fi
    log "installed: ${missing[*]}"
}
