#!/usr/bin/env bash
# Runs the fuzz targets one after another (the machine has 2 shared cores),
# each for SECONDS (default 600), new inputs in fuzz/work/<target> (not
# committed), seeds read from fuzz/corpus/<target>. Prints each target's
# executions. Usage: fuzz/run.sh [SECONDS] [TARGET...]
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-600}; shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(mqtt_decode edge_session device_payload http_api)
mkdir -p work logs
for t in "${targets[@]}"; do
  mkdir -p "work/$t"
  echo "== $t: ${secs}s" 
  cargo +nightly fuzz run "$t" "work/$t" "corpus/$t" -- \
    -max_total_time="$secs" -jobs=1 -print_final_stats=1 -timeout=60 -rss_limit_mb=4096 \
    > "logs/$t.out" 2>&1
  echo "exit $?"
  # -jobs=1 runs the fuzzer in a worker whose output is fuzz-0.log.
  [ -f fuzz-0.log ] && mv fuzz-0.log "logs/$t.log"
  grep -E "stat::number_of_executed_units|^#[0-9]+.*DONE|SUMMARY|panicked|deadly signal" "logs/$t.log" 2>/dev/null | tail -n 5
done
