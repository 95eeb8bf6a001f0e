#!/usr/bin/env bash
# The benchmark (docs/performance.md): installs what is missing, then builds and runs
# dbmazz-bench, which builds dbmazz and the plugins it needs, starts a throwaway
# PostgreSQL, and prints the tables. Arguments go to dbmazz-bench (--quick, --json FILE,
# --only W1,W2,W3,W4,steady,memory, --rates 5000,20000, --steady-seconds 60).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

exec cargo run --release -p dbmazz-bench -- "$@"
