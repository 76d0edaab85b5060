#!/usr/bin/env bash
# Installs emu35-serve on top of a vLLM base image: the build step every Dockerfile here shares.
#
#   RUN --mount=type=bind,source=.,target=/tmp/emu35-src,rw bash /tmp/emu35-src/docker/install.sh
#
# The base image (vllm-ascend for Atlas A2/A3, vllm-openai for CUDA) already carries vLLM, its
# platform plugin, torch (and torch_npu) and most of what this service needs. They are left exactly
# as the base has them: the project itself goes in with --no-deps, the few dependencies the base
# lacks are installed under a constraints file that pins every package already present, and the
# build fails if any of them moved anyway. Nothing here edits vLLM: the service reaches it through
# its plugin entry point only (design.md §8, §9).
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
# The service's user; the Dockerfiles' `USER 1000:1000` and the Kubernetes securityContext match.
SERVICE_UID=1000
SERVICE_GID=1000
# HOME and working directory (the Dockerfiles' HOME / WORKDIR): vLLM's and CANN's caches, CANN's
# kernel_meta/ and the NPU logs go there, so it must be writable (Kubernetes mounts an emptyDir).
SERVICE_HOME=/home/emu35
# Where the Kubernetes manifests point EMU35_OUTPUT_DIR (an emptyDir is mounted over it).
RECORDS_DIR=/var/lib/emu35/records

# Runtime dependencies of pyproject.toml that vLLM 0.11 brings into both base images (its own
# requirements: transformers (→ safetensors), tiktoken, protobuf, pillow, pyyaml, prometheus_client,
# pydantic, fastapi[standard] (→ uvicorn, python-multipart), numpy, tqdm; torch from the base). Checked,
# never installed.
BASE_DEPS=(torch numpy tiktoken safetensors pyyaml pillow protobuf transformers fastapi uvicorn
           pydantic prometheus-client python-multipart tqdm)
# ... and the ones vLLM 0.11 does not require, installed here (same lower bounds as pyproject.toml).
EXTRA_DEPS=("pydantic-settings>=2.10" "sse-starlette>=2.1" "imageio-ffmpeg>=0.5" "fastapi-offline>=1.7"
            "sqlalchemy[asyncio]>=2.0" "aiosqlite>=0.20" "asyncpg>=0.29" "standardwebhooks>=1.0" "httpx>=0.27")
# The `quant` extra of pyproject.toml: msModelSlim, for `python -m service quantize` (the W8A8 Job,
# deploy/components/w8a8-quantize). Installed the same way: base packages pinned, checked after.
QUANT_DEPS=("msmodelslim==26.1.0")

export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# The base images' Python is the environment vLLM lives in; adding to it is the point (PEP 668).
export PIP_BREAK_SYSTEM_PACKAGES=1

log() { printf 'emu35 install: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Requirement "name>=x" -> "name".
req_name() { local req="$1"; printf '%s\n' "${req%%[<>=!~ ;\[]*}"; }

check_base_deps() {
    local name missing=()
    for name in "${BASE_DEPS[@]}"; do
        "$PYTHON" -m pip show --quiet "$name" >/dev/null 2>&1 || missing+=("$name")
    done
    ((${#missing[@]} == 0)) || die "the base image lacks ${missing[*]} (expected from vLLM); add them to EXTRA_DEPS"
}

install_packages() {
    local work extra_names=() req moved
    work="$(mktemp -d)"
    for req in "${EXTRA_DEPS[@]}" "${QUANT_DEPS[@]}"; do extra_names+=("$(req_name "$req")"); done

    # Everything already installed is pinned, except the packages this step may add or upgrade; the
    # same list is the snapshot that the result is compared with.
    "$PYTHON" "$SRC/docker/freeze.py" --exclude "${extra_names[@]}" emu35-serve >"$work/base.txt"

    log "installing ${EXTRA_DEPS[*]} ${QUANT_DEPS[*]} (base packages pinned)"
    "$PYTHON" -m pip install --constraint "$work/base.txt" "${EXTRA_DEPS[@]}" "${QUANT_DEPS[@]}"
    log "installing the service (--no-deps)"
    "$PYTHON" -m pip install --no-deps "$SRC"

    "$PYTHON" "$SRC/docker/freeze.py" --exclude "${extra_names[@]}" emu35-serve >"$work/after.txt"
    # Pins of the base that are gone from the result: a package was removed, up- or downgraded.
    moved="$(comm -23 <(sort "$work/base.txt") <(sort "$work/after.txt"))"
    [[ -z "$moved" ]] || die "installing changed packages of the base image: ${moved//$'\n'/, }"
    rm -rf "$work"
}

check_installed() {
    command -v emu35-serve >/dev/null || die "the emu35-serve console script is not on PATH"
    # Our own requirements must all be met; whatever else pip check reports belongs to the base.
    if "$PYTHON" -m pip check 2>&1 | grep -i '^emu35-serve '; then
        die "unmet requirements of emu35-serve (see above)"
    fi
    # Imports that need no accelerator (settings, record schema, the plugin's module), and the entry
    # point through which vLLM loads the plugin in each of its processes.
    "$PYTHON" - <<'PY'
from importlib.metadata import entry_points

import service.engine.in_vllm.plugin
import service.record.story_pb2
import service.settings

plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
assert plugins.get("emu35") == "service.engine.in_vllm.plugin:register", plugins
# msModelSlim finds the Emu3.5 adapter through its entry-point group (python -m service quantize)
adapters = {ep.name: ep.value for ep in entry_points(group="msmodelslim.model_adapter.plugins")}
assert adapters.get("EMU3.5") == "service.quant.msmodelslim_adapter:Emu35AdapterLoader", adapters
PY
}

create_user() {
    getent group "$SERVICE_GID" >/dev/null || groupadd --gid "$SERVICE_GID" emu35
    if ! getent passwd "$SERVICE_UID" >/dev/null; then
        useradd --uid "$SERVICE_UID" --gid "$SERVICE_GID" --home-dir "$SERVICE_HOME" --no-create-home \
            --shell /usr/sbin/nologin emu35
    fi
    install -d -o "$SERVICE_UID" -g "$SERVICE_GID" -m 0750 "$SERVICE_HOME" "$RECORDS_DIR"
    install -m 0755 "$SRC/docker/healthcheck.py" /usr/local/bin/emu35-healthcheck
}

main() {
    cd /  # so that imports below find the installed package, not a source tree
    check_base_deps
    install_packages
    check_installed
    create_user
    log "done"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
