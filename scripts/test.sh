#!/usr/bin/env bash
# The test command: installs what the tests need (scripts/setup.sh, idempotent), then
# runs every test of the workspace in the release profile (the one profile the project
# builds, so RocksDB and wasmtime compile once). Arguments go to `cargo test`, e.g.
# `./scripts/test.sh --test replication`. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
start=$(date +%s)
cargo test --release --workspace "$@"
echo "==> tests took $(( $(date +%s) - start )) s"
