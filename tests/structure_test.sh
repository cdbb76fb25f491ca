#!/usr/bin/env bash
# The layout's rules, checked: gRPC stays in server/api/ and server/server.cc (the stages below cannot
# name it, not even in a comment), no function in core/ or server/ is over 60 lines, and no C++ line is over
# the 120 columns of .clang-format.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
if found=$(grep -rli grpc server/batching server/runtime server/observability server/sessions); then
  echo "structure_test: FAIL: gRPC named below the service layer:"; echo "$found"; status=1
fi
if ! /usr/bin/python3 scripts/function-lengths.py --max 60 core server tools client; then status=1; fi
if long=$(find core server tools client tests bench examples -name '*.cc' -o -name '*.h' 2>/dev/null |
           xargs awk 'length > 120 {print FILENAME ":" FNR ": " length " columns"}') && [ -n "$long" ]; then
  echo "structure_test: FAIL: C++ lines over 120 columns (clang-format them, .clang-format):"; echo "$long"; status=1
fi
[ "$status" -eq 0 ] && echo "structure_test: PASS"
exit "$status"
