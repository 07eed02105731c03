# Sourced by scripts/run-proxy and scripts/test: find or install uv, then sync the project's
# environment from uv.lock. Works on a fresh Debian machine with Python 3.11.
set -euo pipefail

root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root_dir"

find_uv() {
    if command -v uv >/dev/null 2>&1; then
        UV=$(command -v uv)
        return 0
    fi
    local tool_env="${XDG_CACHE_HOME:-$HOME/.cache}/egress-bootstrap"
    if [ ! -x "$tool_env/bin/uv" ]; then
        if ! python3 -m venv "$tool_env" >/dev/null 2>&1; then
            # Debian ships venv separately; install it when we may.
            if [ "$(id -u)" = 0 ]; then
                apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
                rm -rf "$tool_env"
                python3 -m venv "$tool_env"
            else
                echo "egress: python3 -m venv failed; install python3-venv (apt-get install python3-venv)" >&2
                exit 1
            fi
        fi
        "$tool_env/bin/pip" install --quiet --disable-pip-version-check uv
    fi
    UV="$tool_env/bin/uv"
}

find_uv
export UV_PROJECT_ENVIRONMENT="$root_dir/.venv"
