#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 300), one at a time, with the seed corpora in
# corpus/ (regenerate them with the make_seeds binary). Usage: fuzz/run.sh [SECONDS] [TARGET...]
# Needs cargo-fuzz and a nightly toolchain (`cargo install cargo-fuzz`).
set -u
cd "$(dirname "$0")"
secs="${1:-300}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(trace_reader npy safetensors sglang nrlre1 r3v1 prime_rl)
fi
mkdir -p logs
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=1024 \
    -timeout=10 -print_final_stats=1 > "logs/$t.log" 2>&1
  echo "$t: exit $? $(grep -E '^stat::number_of_executed_units' "logs/$t.log" | tail -1)"
done
