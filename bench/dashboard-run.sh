#!/usr/bin/env bash
# The dashboard over a benchmark run, without a Grafana: starts attnserve and Debian's Prometheus on loopback
# (scraping every second, deploy/observability/rules.yaml loaded when present), runs about a minute of
# attnbench load with the phases below, then draws every panel of deploy/observability/dashboard.json over the
# run with bench/dashboard_png.py (python3-matplotlib).
#
#   0 s    closed loop on "small" (E=256, H=4, L=128) at concurrency 1, 4, then 16 (15 s each, 2 s warm-up)
#   5 s    4 decode sessions on "decode" (context 256) and one session prefilling 256 tokens over and over
#   26 s   2 s of requests past max_sequence_length (INVALID_ARGUMENT)
#   36 s   SIGHUP: a config reload, every layer reloaded as version 2
#
# Usage: bench/dashboard-run.sh [BUILD_DIR] [OUT_PNG]   (defaults: build, bench/results/dashboard.png)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$(cd "${1:-$ROOT/build}" && pwd)"
OUT="${2:-$ROOT/bench/results/dashboard.png}"
ATTNSERVE="$BUILD/server/attnserve"
ATTNBENCH="$BUILD/tools/attnbench"
PROMETHEUS="${PROMETHEUS:-/usr/bin/prometheus}"
RULES="$ROOT/deploy/observability/rules.yaml"
for f in "$ATTNSERVE" "$ATTNBENCH" "$PROMETHEUS"; do
  [[ -x $f ]] || { echo "dashboard-run: $f is not there (make; apt-get install prometheus)" >&2; exit 1; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/attnserve_dashboard_run.XXXXXX")
PIDS=()
cleanup() {
  local status=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ $status -ne 0 ]]; then
    for log in "$WORK"/*.log; do [[ -f $log ]] && { echo "--- $log (tail)"; tail -n 15 "$log"; }; done
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat >"$WORK/config.pbtxt" <<'EOF'
layers { name: "small" embed_dim: 256 num_heads: 4 seed: 1 max_sequence_length: 1024 }
layers { name: "decode" embed_dim: 256 num_heads: 4 seed: 2 }
sessions { kv_cache_bytes: 67108864 }
EOF
"$ATTNSERVE" --config "$WORK/config.pbtxt" --grpc-address 127.0.0.1:0 --metrics-address 127.0.0.1:0 \
  --shutdown-grace 2s >"$WORK/attnserve.log" 2>&1 &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
for _ in $(seq 300); do
  grep -q 'ready: grpc_port=' "$WORK/attnserve.log" && break
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "dashboard-run: attnserve exited" >&2; exit 1; }
  sleep 0.1
done
GRPC_PORT=$(grep -o 'grpc_port=[0-9]*' "$WORK/attnserve.log" | head -1 | cut -d= -f2)
METRICS_PORT=$(grep -o 'metrics_port=[0-9]*' "$WORK/attnserve.log" | head -1 | cut -d= -f2)
[[ -n $GRPC_PORT && -n $METRICS_PORT ]] || { echo "dashboard-run: attnserve never ready" >&2; exit 1; }

PROM_PORT=$(/usr/bin/python3 -c \
  'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
{
  printf 'global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n'
  [[ -f $RULES ]] && printf 'rule_files:\n  - "%s"\n' "$RULES"
  printf 'scrape_configs:\n  - job_name: attnserve\n    scrape_interval: 1s\n    scrape_timeout: 1s\n'
  printf '    static_configs:\n      - targets: ["127.0.0.1:%s"]\n' "$METRICS_PORT"
} >"$WORK/prometheus.yml"
"$PROMETHEUS" --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PIDS+=($!)
PROM="http://127.0.0.1:$PROM_PORT"
# Prometheus applies its targets every 5 s: the run starts once it has scraped attnserve.
for _ in $(seq 300); do
  curl -fsS --max-time 2 "$PROM/api/v1/query" --data-urlencode 'query=up{job="attnserve"} == 1' 2>/dev/null |
    grep -q '"value"' && break
  sleep 0.1
done
echo "dashboard-run: attnserve grpc $GRPC_PORT metrics $METRICS_PORT, prometheus $PROM"

sleep 2
START=$(date +%s)
bench=("$ATTNBENCH" --target "127.0.0.1:$GRPC_PORT" --quiet --timeout-ms 10000)
"${bench[@]}" --layer small --seq 128 --concurrency 1,4,16 --duration 15s --warmup 2s >"$WORK/closed.log" 2>&1 &
CLOSED=$!
PIDS+=("$CLOSED")
sleep 5
"${bench[@]}" --layer decode --sessions 4 --context 256 --prefill 256 --duration 25s --warmup 0 \
  >"$WORK/sessions.log" 2>&1 &
SESSIONS=$!
PIDS+=("$SESSIONS")
sleep 21
"${bench[@]}" --layer small --seq 2048 --concurrency 1 --duration 2s --warmup 0 >"$WORK/errors.log" 2>&1
sleep 8
kill -HUP "$SERVER_PID"
wait "$CLOSED" "$SESSIONS"
sleep 5
END=$(date +%s)
for log in closed sessions errors; do echo "--- attnbench ($log)"; cat "$WORK/$log.log"; done

mkdir -p "$(dirname "$OUT")"
/usr/bin/python3 "$ROOT/bench/dashboard_png.py" --prometheus "$PROM" --start "$START" --end "$END" --step 1 \
  --rate-interval 5s --out "$OUT" \
  --title "attnserve dashboard (deploy/observability/dashboard.json) over bench/dashboard-run.sh, \
$((END - START)) s on $(nproc) cores:\n\
closed loop on small (E=256, H=4, L=128) at concurrency 1, 4, 16 for 17 s each; 4 decode sessions (context 256) \
and a 256-token prefill loop on decode from 5 s to 30 s;\ninvalid requests (L past max_sequence_length) at 26 s; \
SIGHUP (config reload: every layer reloaded as version 2) at 36 s"
