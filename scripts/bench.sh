#!/usr/bin/env bash
# The benchmark (docs/performance.md): installs what is missing, then builds and runs
# dbmazz-bench, which builds dbmazz and the plugins it needs, starts a throwaway
# PostgreSQL, and prints the tables. Arguments go to dbmazz-bench (--quick, --json FILE,
# --only W1,W2,W3,W4,steady,memory, --rates 5000,20000, --steady-seconds 60).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql-15)
if [ ${#need[@]} -gt 0 ]; then
    echo "==> installing ${need[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

exec cargo run --release -p dbmazz-bench -- "$@"
