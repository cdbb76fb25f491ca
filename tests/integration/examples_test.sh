#!/usr/bin/env bash
# Runs the client examples (examples/python and examples/node) against a live server.
# Usage: tests/integration/examples_test.sh path/to/attnserve   (from any directory)
# Starts the server on free ports, waits for its "ready: grpc_port=N" log line, runs both examples against
# 127.0.0.1:N and fails if either fails. The server is always stopped (SIGTERM, then wait) and the
# temporary directory removed.
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 path/to/attnserve" >&2
  exit 2
fi
SERVER="$(realpath "$1" 2>/dev/null)"
if [ ! -x "$SERVER" ]; then
  echo "examples_test: FAIL: no server binary at $1" >&2
  exit 1
fi
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-/usr/bin/python3}"  # Debian's, with python3-grpcio and python3-numpy
NODE="${NODE:-node}"
READY_TIMEOUT_S=60
EXAMPLE_TIMEOUT_S=300

TMP="$(mktemp -d -t attnserve-examples-test.XXXXXX)"
SERVER_PID=""

stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null
    # The server drains and exits; give it its grace period, then make sure.
    for _ in $(seq 1 350); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "examples_test: server did not stop after SIGTERM; killing it" >&2
      kill -KILL "$SERVER_PID" 2>/dev/null
    fi
    wait "$SERVER_PID" 2>/dev/null
    echo "examples_test: server stopped (exit $?)"
  fi
  SERVER_PID=""
}
cleanup() {
  stop_server
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

show_server_log() {
  echo "---- server stderr (last 30 lines) ----" >&2
  tail -n 30 "$TMP/server.err" >&2
  echo "---------------------------------------" >&2
}

# --log-level info: the ready line is an info line, whatever ATTNSERVE_LOG_LEVEL says.
# ATTNSERVE_CONFIG is dropped so the embedded default config (layers small and base) is served. The server
# requires a token, which the examples read from ATTNSERVE_TOKEN.
: >"$TMP/server.err"
TOKEN="examples-$RANDOM-$RANDOM-$RANDOM"
echo "sha256:$(printf %s "$TOKEN" | sha256sum | cut -d' ' -f1) infer" >"$TMP/tokens"
env -u ATTNSERVE_CONFIG -u ATTNSERVE_TOKEN "$SERVER" --grpc-address 127.0.0.1:0 --metrics-address 127.0.0.1:0 \
  --log-level info --shutdown-grace 30s --auth-token-file "$TMP/tokens" >"$TMP/server.out" 2>"$TMP/server.err" &
SERVER_PID=$!

PORT=""
for _ in $(seq 1 $((READY_TIMEOUT_S * 10))); do
  PORT="$(grep -o 'ready: grpc_port=[0-9]*' "$TMP/server.err" | head -n 1 | cut -d= -f2)"
  [ -n "$PORT" ] && break
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    wait "$SERVER_PID"
    echo "examples_test: FAIL: server exited (status $?) before it was ready" >&2
    SERVER_PID=""
    show_server_log
    exit 1
  fi
  sleep 0.1
done
if [ -z "$PORT" ]; then
  echo "examples_test: FAIL: no 'ready: grpc_port=N' line within ${READY_TIMEOUT_S}s" >&2
  show_server_log
  exit 1
fi
TARGET="127.0.0.1:$PORT"
echo "examples_test: server ready on $TARGET"

failures=()
export ATTNSERVE_TOKEN="$TOKEN"

echo "== python without the token: must fail with UNAUTHENTICATED"
if ATTNSERVE_TOKEN= PYTHONDONTWRITEBYTECODE=1 timeout "$EXAMPLE_TIMEOUT_S" \
    "$PYTHON" "$REPO_ROOT/examples/python/attn_client.py" --target "$TARGET" >"$TMP/no-token.out" 2>&1 ||
    ! grep -q UNAUTHENTICATED "$TMP/no-token.out"; then
  cat "$TMP/no-token.out" >&2
  failures+=(python-without-token)
fi

echo "== python: examples/python/attn_client.py --target $TARGET"
if ! PYTHONDONTWRITEBYTECODE=1 timeout "$EXAMPLE_TIMEOUT_S" \
    "$PYTHON" "$REPO_ROOT/examples/python/attn_client.py" --target "$TARGET"; then
  failures+=(python)
fi

echo "== node: examples/node/attn_client.js --target $TARGET"
if [ ! -d "$REPO_ROOT/examples/node/node_modules" ]; then
  echo "examples_test: examples/node/node_modules is missing: run scripts/install-deps.sh" >&2
  failures+=(node)
elif ! timeout "$EXAMPLE_TIMEOUT_S" "$NODE" "$REPO_ROOT/examples/node/attn_client.js" --target "$TARGET"; then
  failures+=(node)
fi

if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  echo "examples_test: FAIL: the server died during the examples" >&2
  failures+=(server)
fi

if ((${#failures[@]})); then
  echo "examples_test: FAIL: ${failures[*]}" >&2
  show_server_log
  exit 1
fi
echo "examples_test: PASS (python, node)"
