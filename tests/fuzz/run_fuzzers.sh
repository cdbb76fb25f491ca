#!/usr/bin/env bash
# Runs each libFuzzer harness of a fuzz build (make fuzz) for SECONDS, one after another, on a working copy of
# its committed corpus (BUILD/fuzz/corpus/<harness>, kept between runs; the committed tests/fuzz/corpus is only
# read) plus its regressions. Crash, leak, timeout and out-of-memory inputs are written to
# BUILD/fuzz/artifacts/<harness>/ and the run fails, naming each; logs are in BUILD/fuzz/logs/<harness>.log.
#   usage: tests/fuzz/run_fuzzers.sh BUILD SECONDS HARNESS...
set -euo pipefail
cd "$(dirname "$0")/../.."
build=$1 seconds=$2
shift 2

# Largest input per harness: a few small InferRequests / state_dicts / configs fit with room to grow.
max_len() {
  case "$1" in
    infer_request_fuzz | kserve_request_fuzz) echo 8192 ;;
    safetensors_fuzz) echo 8192 ;;
    config_fuzz) echo 4096 ;;
    *) echo 4096 ;;
  esac
}

failed=()
for harness in "$@"; do
  binary="$build/tests/fuzz/$harness"
  work="$build/fuzz/corpus/$harness"
  artifacts="$build/fuzz/artifacts/$harness"
  log="$build/fuzz/logs/$harness.log"
  mkdir -p "$work" "$artifacts" "$(dirname "$log")"
  cp -n tests/fuzz/corpus/"$harness"/* "$work"/
  rm -f "$artifacts"/*
  echo "fuzz: $harness for ${seconds}s (log $log)"
  status=0
  # The first directory receives new inputs; the regressions are read only. -timeout: one input may take
  # 25 s at most; -rss_limit_mb also bounds a single malloc (-malloc_limit_mb defaults to it).
  "$binary" -max_total_time="$seconds" -rss_limit_mb=2048 -max_len="$(max_len "$harness")" -timeout=25 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" "$work" "tests/fuzz/regressions/$harness" \
    >"$log" 2>&1 || status=$?
  # The last status line holds the totals: executions, coverage (edges), features, corpus.
  grep -E '^#[0-9]+' "$log" | tail -n 1 || true
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
  crashes=("$artifacts"/*)
  if [ "$status" -ne 0 ] || [ -e "${crashes[0]}" ]; then
    echo "fuzz: $harness FAILED (exit $status); the report:"
    grep -E -A 30 '^==[0-9]+==ERROR|runtime error|^(infer_request|safetensors|config)_fuzz:' "$log" | head -n 60 || tail -n 40 "$log"
    for crash in "${crashes[@]}"; do
      [ -e "$crash" ] && echo "fuzz: $harness crash input: $crash"
    done
    failed+=("$harness")
  fi
done

if ((${#failed[@]})); then
  echo "fuzz: crashes in ${failed[*]}: fix them, then add each input to tests/fuzz/regressions/<harness>/"
  exit 1
fi
echo "fuzz: no crashes in $*"
