#!/usr/bin/env bash
# Scale-out: three attnserve replicas on loopback behind one round_robin target (as a client sees the pods
# of a headless Kubernetes Service). attnbench runs a ~9 s closed loop across them; every replica must
# serve part of it; then one replica is SIGKILLed mid-run. attnbench must finish and report only the
# requests that were in flight on the killed replica as failed, and the other two must keep answering.
#
# Usage: scale_out_test.sh ATTNSERVE_BINARY ATTNBENCH_BINARY
set -euo pipefail

ATTNSERVE=${1:?usage: scale_out_test.sh ATTNSERVE_BINARY ATTNBENCH_BINARY}
ATTNBENCH=${2:?usage: scale_out_test.sh ATTNSERVE_BINARY ATTNBENCH_BINARY}
CONCURRENCY=6
DURATION_S=9  # room for the polls below (up to 3 s, then 1 + 2 s) before the run ends

WORK=$(mktemp -d "${TMPDIR:-/tmp}/attnserve_scale_out.XXXXXX")
PIDS=()
cleanup() {
  local status=$?
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ $status -ne 0 ]]; then
    for log in "$WORK"/*.log "$WORK"/*.err; do
      [[ -f $log ]] && { echo "--- $log (tail)"; tail -n 20 "$log"; }
    done
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# Sum of attnserve_requests_total over all label sets on a metrics port (0 before the first request).
requests_total() {
  curl -fsS --max-time 5 "http://127.0.0.1:$1/metrics" |
    awk '/^attnserve_requests_total\{/ { sum += $NF } END { printf "%d\n", sum }'
}

# A metrics port's requests_total once it exceeds BEFORE, or its last reading after SECONDS.
grew_within() {
  local seconds=$1 port=$2 before=$3 now
  for _ in $(seq $((seconds * 10))); do
    now=$(requests_total "$port")
    ((now > before)) && break
    sleep 0.1
  done
  echo "$now"
}

GRPC_PORTS=()
METRICS_PORTS=()
SERVER_PIDS=()
for i in 0 1 2; do
  "$ATTNSERVE" --grpc-address 127.0.0.1:0 --metrics-address 127.0.0.1:0 >"$WORK/server$i.log" 2>&1 &
  PIDS+=($!)
  SERVER_PIDS+=($!)
done
for i in 0 1 2; do
  for _ in $(seq 600); do
    grep -q 'ready: grpc_port=' "$WORK/server$i.log" && break
    kill -0 "${SERVER_PIDS[$i]}" 2>/dev/null || fail "server $i exited before it was ready"
    sleep 0.1
  done
  line=$(grep -o 'ready: grpc_port=[0-9]* metrics_port=[0-9]*' "$WORK/server$i.log") || fail "server $i never ready"
  GRPC_PORTS+=("$(sed 's/.*grpc_port=\([0-9]*\).*/\1/' <<<"$line")")
  METRICS_PORTS+=("$(sed 's/.*metrics_port=\([0-9]*\)/\1/' <<<"$line")")
done
TARGET="ipv4:127.0.0.1:${GRPC_PORTS[0]},127.0.0.1:${GRPC_PORTS[1]},127.0.0.1:${GRPC_PORTS[2]}"
echo "servers ready: grpc ports ${GRPC_PORTS[*]}, metrics ports ${METRICS_PORTS[*]}"

BEFORE=()
for i in 0 1 2; do BEFORE+=("$(requests_total "${METRICS_PORTS[$i]}")"); done

"$ATTNBENCH" --target "$TARGET" --concurrency "$CONCURRENCY" --duration "$DURATION_S" --warmup 0 --seq 16 \
  --timeout-ms 10000 --json --quiet >"$WORK/bench.json" 2>"$WORK/bench.err" &
BENCH_PID=$!
PIDS+=("$BENCH_PID")

# Every replica serves part of the load: polled for up to 3 s, since round_robin sends only to the replicas it
# has connected to, which takes longer when the machine is busy (or under a sanitizer).
for i in 0 1 2; do
  now=$(grew_within 3 "${METRICS_PORTS[$i]}" "${BEFORE[$i]}")
  echo "server $i: attnserve_requests_total ${BEFORE[$i]} -> $now"
  ((now > BEFORE[i])) || fail "server $i got no requests from the round_robin client"
done

# Kill one mid-run; the others must keep answering.
kill -9 "${SERVER_PIDS[2]}"
wait "${SERVER_PIDS[2]}" 2>/dev/null || true
echo "killed server 2 (SIGKILL) once all three served"
AT_KILL=("$(requests_total "${METRICS_PORTS[0]}")" "$(requests_total "${METRICS_PORTS[1]}")")
sleep 1
for i in 0 1; do
  now=$(grew_within 2 "${METRICS_PORTS[$i]}" "${AT_KILL[$i]}")
  echo "server $i after the kill: ${AT_KILL[$i]} -> $now"
  ((now > AT_KILL[i])) || fail "server $i stopped answering after server 2 was killed"
done

# attnbench finishes on its own (no hang on the dead replica) and succeeds.
for _ in $(seq 600); do
  kill -0 "$BENCH_PID" 2>/dev/null || break
  sleep 0.1
done
kill -0 "$BENCH_PID" 2>/dev/null && fail "attnbench still running 60 s after its ${DURATION_S} s run"
bench_status=0
wait "$BENCH_PID" || bench_status=$?
((bench_status == 0)) || fail "attnbench exited with $bench_status: $(cat "$WORK/bench.err")"

read -r requests errors codes < <(/usr/bin/env python3 -c '
import json, sys
step = json.load(open(sys.argv[1]))[0]
codes = ",".join(f"{c}:{n}" for c, n in sorted(step["errors_by_code"].items())) or "none"
print(step["requests"], step["errors"], codes)' "$WORK/bench.json")
echo "killed server: $errors requests failed of $requests (by code: $codes)"
((requests > 0)) || fail "attnbench reported no requests"
# Only requests in flight on the killed replica may fail: per worker, the one it had there at the kill,
# plus at most one more that the round_robin picker sent there before the client saw the connection drop
# (it learns of the closed socket asynchronously). Every failure must be UNAVAILABLE.
MAX_LOST=$((2 * CONCURRENCY))
((errors <= MAX_LOST)) || fail "$errors requests failed, more than the $MAX_LOST that can be in flight"
[[ $codes == none || $codes == "UNAVAILABLE:$errors" ]] || fail "failures other than UNAVAILABLE: $codes"
echo "PASS"
