# Sourced by the scripts/install-*.sh helpers: `apt_install WHO PACKAGE...` installs Debian packages
# with apt-get, as root or through sudo, from whatever mirror the machine is configured for.
#
# The distribution's packages on purpose: they install from a local mirror on a cluster, where
# tool-specific downloads (Playwright's browsers, EDB's PostgreSQL builds) need the internet.

apt_install() {
    local who=$1
    shift
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$who: no apt-get here; install $* with your package manager" >&2
        return 1
    fi
    # root runs apt-get directly; anyone else needs sudo
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "$who: not root and no sudo; install $* as root" >&2
            return 1
        fi
        sudo=sudo
    fi
    # refresh the package lists only when apt does not know the package yet (a fresh image has none)
    if ! apt-cache show "$1" >/dev/null 2>&1; then
        $sudo apt-get update -q
    fi
    local install=($sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@")
    # stale package lists name versions the mirror no longer has: refresh once and retry
    "${install[@]}" || { $sudo apt-get update -q && "${install[@]}"; }
}
