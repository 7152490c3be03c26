#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60) each, one after the other, from the
# committed seeds; new inputs go to corpus/<target>/ (not committed), crashes to
# artifacts/<target>/. Prints libFuzzer's last status line per target.
#
# cargo-fuzz needs a nightly compiler for -Zsanitizer; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept those flags.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
targets=("$@")
((${#targets[@]})) || targets=(record_open record_train socks sudp_negotiation config users)
export RUSTC_BOOTSTRAP=1
cargo fuzz build
mkdir -p logs
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "== $t (${secs}s)"
  cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 \
    -print_final_stats=1 >"logs/$t.log" 2>&1 || { echo "$t FAILED: see fuzz/logs/$t.log"; tail -30 "logs/$t.log"; exit 1; }
  grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE)' "logs/$t.log" | tail -1
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "logs/$t.log"
  echo "corpus: $(find "corpus/$t" -type f | wc -l) files, $(du -sb "corpus/$t" | cut -f1) bytes"
done
