#!/usr/bin/env bash
# Quickstart: installs what is missing, builds dbmazz and its plugins, then runs
# `dbmazz quickstart`: a throwaway PostgreSQL, a pipeline through the transform-filter and
# sink-webhook plugins, a local receiver printing each CloudEvent, and a stream of
# changes. Arguments go to `dbmazz quickstart` (--seconds N, 0 = until Ctrl-C; --rate N;
# --sink starrocks to load the in-memory StarRocks test double through sink-starrocks;
# --sink postgres to replicate into a second database through sink-postgres).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "==> building dbmazz and its plugins (the first build compiles RocksDB and wasmtime: ~15 minutes on 2 cores)"
cargo build --release -p dbmazz
cargo build --release --target wasm32-wasip2 -p transform-filter -p sink-webhook -p sink-starrocks -p sink-postgres

exec target/release/dbmazz quickstart --plugins target/wasm32-wasip2/release "$@"
