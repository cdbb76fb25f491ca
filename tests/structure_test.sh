#!/usr/bin/env bash
# The layout's rules, checked: gRPC stays in server/api/ and server/server.cc (the stages below cannot
# name it, not even in a comment), and no function in core/ or server/ is over 60 lines.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
if found=$(grep -rli grpc server/batching server/runtime server/observability server/sessions); then
  echo "structure_test: FAIL: gRPC named below the service layer:"; echo "$found"; status=1
fi
if ! /usr/bin/python3 scripts/function-lengths.py --max 60 core server tools client; then status=1; fi
[ "$status" -eq 0 ] && echo "structure_test: PASS"
exit "$status"
