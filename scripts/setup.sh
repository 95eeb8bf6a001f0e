#!/usr/bin/env bash
# Installs what building, running and testing dbmazz needs, when missing (quietly
# succeeds when it is all there): libclang (bindgen for RocksDB), PostgreSQL 15 server and
# client (the quickstart, the benchmark and the tests start throwaway clusters from its
# binaries), Node.js and npm (JavaScript plugins), the WebAssembly targets listed in
# scripts/wasm-targets, and the Python and JavaScript SDKs' toolchains. Used by
# quickstart.sh, test.sh, bench.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql-15)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client-15)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
# the tests make TLS certificates with openssl, signal dbmazz with kill(1) (procps) and
# build Python plugins in a venv
command -v openssl >/dev/null 2>&1 || need+=(openssl)
[ -x /bin/kill ] || [ -x /usr/bin/kill ] || need+=(procps)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    echo "==> installing ${need[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The tests run PostgreSQL as this user when they run as root (root may not run it).
id postgres >/dev/null 2>&1 || { echo "setup: the postgres user is missing (it comes with the postgresql-15 package)" >&2; exit 1; }

installed=$(rustup target list --installed)
while read -r t; do
    case "$t" in ''|'#'*) continue ;; esac
    grep -qx "$t" <<<"$installed" && continue
    echo "==> adding the $t target"
    rustup target add "$t" || {
        echo "setup: rustup cannot add the $t target here; the plugins need it (a machine without it needs Debian's rustc-web and -Zbuild-std, see docs)" >&2
        exit 1
    }
done < scripts/wasm-targets

# Python plugins: a venv in target/python with componentize-py and pytest (from PyPI, once),
# and this checkout's Python SDK (sdk/python, installed again every time: it is small).
py=target/python
if [ ! -x "$py/bin/componentize-py" ] || ! "$py/bin/python" -c "import pytest" 2>/dev/null; then
    echo "==> creating $py (componentize-py 0.25.1, pytest)"
    python3 -m venv "$py"
    "$py/bin/pip" install -q --disable-pip-version-check componentize-py==0.25.1 pytest
fi
"$py/bin/pip" install -q --disable-pip-version-check --no-deps ./sdk/python
rm -rf sdk/python/build sdk/python/src/*.egg-info

# JavaScript plugins: the SDK's dependencies (ComponentizeJS 0.23.0, esbuild; from the npm
# registry, once, as its package-lock.json pins them) and the templates' links to the SDK.
if [ ! -d sdk/js/node_modules/@bytecodealliance/componentize-js ] || [ sdk/js/package-lock.json -nt sdk/js/node_modules/.package-lock.json ]; then
    echo "==> installing the JavaScript SDK's dependencies (sdk/js/node_modules)"
    (cd sdk/js && npm install --no-audit --no-fund --loglevel=error)
fi
for t in sink-js transform-js; do
    if [ ! -e examples/$t/node_modules/@dbmazz/sdk ]; then
        (cd examples/$t && npm install --no-audit --no-fund --loglevel=error)
    fi
done
