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

# One libFuzzer process is one core: the targets run side by side, as many at a time as
# there are cores (`nproc`), each for `seconds`.
run_target() {
  local t="$1" corpus="target/fuzz/corpus/$1" artifacts="target/fuzz/artifacts/$1/"
  local log="target/fuzz/$1.log" status=0
  mkdir -p "$corpus" "$artifacts"
  # the first directory receives new inputs; the seeds are read only
  "target/fuzz/$triple/release/$t" "$corpus" "fuzz/seeds/$t" \
    -max_total_time="$seconds" -artifact_prefix="$artifacts" -print_final_stats=1 \
    -timeout=10 -rss_limit_mb=1024 >"$log" 2>&1 || status=$?
  echo "fuzz: $t for ${seconds}s: $(grep -E "stat::number_of_executed_units|stat::new_units_added" "$log" | tr -s ' ' | tr '\n' ' ')"
  if [ "$status" -ne 0 ]; then
    grep -E "panicked|ERROR|SUMMARY|Test unit written|^Base64" "$log" >&2 || true
    echo "fuzz: $t found a crash (exit $status); the input is in $artifacts, the log in $log" >&2
    return 1
  fi
}

# each target's verdict is a file, so the throttling below can reap jobs in any order
rm -f target/fuzz/*.failed
jobs="$(nproc)"
for t in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
    wait -n || true
  done
  (run_target "$t" || touch "target/fuzz/$t.failed") &
done
wait
if ls target/fuzz/*.failed >/dev/null 2>&1; then
  exit 1
fi
