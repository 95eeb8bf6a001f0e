#!/usr/bin/env bash
# Installs what building and running dbmazz needs, when missing (quietly succeeds when it
# is all there): libclang (bindgen for RocksDB), PostgreSQL 15 (the quickstart, the
# benchmark and the tests start throwaway clusters from its binaries), and the
# wasm32-wasip2 target for the plugins. Used by quickstart.sh and bench.sh.
set -euo pipefail

need=()
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql-15)
if [ ${#need[@]} -gt 0 ]; then
    echo "==> installing ${need[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
