#!/usr/bin/env bash
# Runs the coverage-guided fuzz targets of fuzz/ (libFuzzer through libfuzzer-sys) on
# stable Rust: the sanitizer-coverage flags below are the ones cargo-fuzz passes, minus
# the nightly-only AddressSanitizer (Rust code here is safe code; overflow and debug
# assertions are on in fuzz/Cargo.toml's profile).
#
#   scripts/fuzz.sh                 # every target for 60 s each
#   scripts/fuzz.sh 600 pgoutput    # one target for 10 minutes
#   scripts/fuzz.sh 0 value         # one target until it finds a crash (Ctrl-C stops)
#
# Targets: pgoutput, frame, value, copy_text, encoded, assembler, config
# (fuzz/fuzz_targets/*.rs). Seeds are in fuzz/seeds/<target> (made from the pgoutput
# stream captured from PostgreSQL in host/benches/data, from the type battery's values,
# from the example configs, and from earlier runs); what a run learns is kept in
# target/fuzz/corpus/<target>, so the next run starts from it. A crash is written to
# target/fuzz/artifacts/<target>/ and fails the script: replay it with
# `target/fuzz/<triple>/release/<target> FILE`, then make it a regression test next to
# the code it crashed.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(pgoutput frame value copy_text encoded assembler config)
fi

triple="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTFLAGS="-Cpasses=sancov-module \
  -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
  -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares \
  --cfg fuzzing"
# --target keeps the flags off build scripts and proc macros (as cargo-fuzz does)
cargo build --release --manifest-path fuzz/Cargo.toml --target "$triple" \
  --target-dir target/fuzz --bins

failed=0
for t in "${targets[@]}"; do
  corpus="target/fuzz/corpus/$t"
  artifacts="target/fuzz/artifacts/$t/"
  mkdir -p "$corpus" "$artifacts"
  echo "fuzz: $t for ${seconds}s"
  # the first directory receives new inputs; the seeds are read only
  log="target/fuzz/$t.log"
  status=0
  "target/fuzz/$triple/release/$t" "$corpus" "fuzz/seeds/$t" \
    -max_total_time="$seconds" -artifact_prefix="$artifacts" -print_final_stats=1 \
    -timeout=10 -rss_limit_mb=1024 >"$log" 2>&1 || status=$?
  grep -E "stat::number_of_executed_units|stat::new_units_added" "$log" || true
  if [ "$status" -ne 0 ]; then
    grep -E "panicked|ERROR|SUMMARY|Test unit written|^Base64" "$log" >&2 || true
    echo "fuzz: $t found a crash (exit $status); the input is in $artifacts, the log in $log" >&2
    failed=1
  fi
done
exit "$failed"
