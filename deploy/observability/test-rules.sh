#!/usr/bin/env bash
# ctest observability_rules_test (label unit, run by `make test`): checks the Prometheus rules of
# deploy/observability/rules.yaml with promtool (`check rules`, then `test rules` on the unit tests in
# deploy/observability/tests/, where each alert must fire on some synthetic series and stay silent on
# others), then check-rules.py: the PrometheusRule of deploy/k8s/components/prometheusrule holds exactly the
# same groups, every metric and label value the rules read is one the server writes, every alert has a
# severity, a summary, a description naming its metric and a runbook section in docs/operations.md. Then
# proves the checks can fail: a test expecting an alert that cannot fire, a weakened alert threshold, a
# PrometheusRule out of step, a metric the server does not have, and a runbook link without its section must
# each be refused.
#
#   deploy/observability/test-rules.sh            run the checks
#   deploy/observability/test-rules.sh --update   rewrite the PrometheusRule from rules.yaml (after editing it)
#
# Needs promtool (Debian's prometheus package) and python3 with yaml (python3-yaml): scripts/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
OBS=deploy/observability
RULES=$OBS/rules.yaml
COMPONENT=deploy/k8s/components/prometheusrule/prometheusrule.yaml
# Debian's python3 (python3-yaml), as the other tests use, unless $PYTHON names another.
PYTHON="${PYTHON:-/usr/bin/python3}"

# write_component RULES OUT: the PrometheusRule whose spec is RULES's groups (comments and all).
write_component() {
  {
    cat <<'EOF'
# attnserve's recording and alert rules as a prometheus-operator PrometheusRule. Generated from
# deploy/observability/rules.yaml by `deploy/observability/test-rules.sh --update`: edit rules.yaml, then
# regenerate; the test refuses a PrometheusRule whose groups differ from it. A Prometheus managed by the
# operator loads it when its ruleSelector matches these labels (kube-prometheus-stack's default wants
# `release: <its release name>`: add that label in your overlay). Runbook: docs/operations.md.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: attnserve
  labels:
    app.kubernetes.io/name: attnserve
    app.kubernetes.io/component: metrics
spec:
EOF
    sed -n '/^groups:/,$p' "$1" | sed 's/^\(.\)/  \1/'
  } >"$2"
}

if [ "${1:-}" = "--update" ]; then
  write_component "$RULES" "$COMPONENT"
  echo "wrote $COMPONENT from $RULES"
  exit 0
fi

command -v promtool >/dev/null ||
  { echo "observability_rules_test: promtool is missing: run scripts/install-deps.sh (Debian's prometheus package)" >&2; exit 1; }
"$PYTHON" -c 'import yaml' 2>/dev/null ||
  { echo "observability_rules_test: $PYTHON cannot import yaml: run scripts/install-deps.sh (python3-yaml)" >&2; exit 1; }

passed=0 failed=0
ok() { echo "ok: $*"; passed=$((passed + 1)); }
bad() { echo "FAIL: $*" >&2; failed=$((failed + 1)); }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/attnserve-rules-test.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

echo "$(promtool --version 2>&1 | head -n 1)"
if promtool check rules "$RULES" >"$TMP/check.out" 2>&1; then
  ok "promtool check rules: $(grep -o 'SUCCESS.*' "$TMP/check.out" | head -n 1)"
else
  cat "$TMP/check.out" >&2
  bad "promtool check rules $RULES"
fi

tests=("$OBS"/tests/*.yaml)
if promtool test rules "${tests[@]}" >"$TMP/test.out" 2>&1; then
  ok "promtool test rules: ${#tests[@]} files, $(grep -c '^  SUCCESS' "$TMP/test.out") passed"
else
  cat "$TMP/test.out" >&2
  bad "promtool test rules ${tests[*]}"
fi

if "$PYTHON" "$OBS/check-rules.py" >"$TMP/structure.out" 2>&1; then
  ok "check-rules.py: $(cat "$TMP/structure.out")"
else
  cat "$TMP/structure.out" >&2
  bad "check-rules.py"
fi

# must_fail NAME EXPECTED CMD...: CMD must exit non-zero with EXPECTED in its output.
must_fail() {
  local name=$1 expected=$2
  shift 2
  if "$@" >"$TMP/$name.out" 2>&1; then
    bad "$name: accepted"
  elif grep -qF -- "$expected" "$TMP/$name.out"; then
    ok "$name: refused ($expected)"
  else
    cat "$TMP/$name.out" >&2
    bad "$name: refused, but without '$expected'"
  fi
}

# broken_copy NAME: a copy of the rules and tests in $TMP/NAME (the tests name ../rules.yaml).
broken_copy() {
  mkdir -p "$TMP/$1/tests"
  cp "$RULES" "$TMP/$1/rules.yaml"
  cp "$OBS"/tests/*.yaml "$TMP/$1/tests/"
}
# changed FILE SED-SCRIPT: applies the script in place; fails the test when it changes nothing.
changed() {
  cp "$1" "$1.orig"
  sed -i "$2" "$1"
  if cmp -s "$1" "$1.orig"; then bad "sed '$2' changed nothing in $1"; return 1; fi
}

# A test that expects the error alert for layer "base", whose errors are all its clients'.
broken_copy alert-cannot-fire
if changed "$TMP/alert-cannot-fire/tests/errors_test.yaml" 's/^              layer: small$/              layer: base/'; then
  must_fail alert-cannot-fire 'alertname="AttnserveHighErrorRatio", job="attnserve", layer="base"' \
    promtool test rules "$TMP/alert-cannot-fire/tests/errors_test.yaml"
fi
# A weakened rule (10% instead of 1%): its tests catch it.
broken_copy weakened-threshold
if changed "$TMP/weakened-threshold/rules.yaml" 's/ratio_rate5m > 0\.01$/ratio_rate5m > 0.1/'; then
  must_fail weakened-threshold 'alertname: AttnserveHighErrorRatio' \
    promtool test rules "$TMP/weakened-threshold/tests/errors_test.yaml"
fi
# A PrometheusRule edited by hand (one alert's `for` changed).
cp "$COMPONENT" "$TMP/prometheusrule.yaml"
if changed "$TMP/prometheusrule.yaml" '0,/^\( *\)for: 5m$/s//\1for: 10m/'; then
  must_fail prometheusrule-out-of-step 'spec.groups differ' \
    "$PYTHON" "$OBS/check-rules.py" --prometheusrule "$TMP/prometheusrule.yaml"
fi
# broken_rules NAME SED WANT: a copy of rules.yaml edited by SED (its PrometheusRule regenerated, so only the
# edit is wrong), which check-rules.py must refuse saying WANT.
broken_rules() {
  local name=$1 edit=$2 want=$3
  broken_copy "$name"
  changed "$TMP/$name/rules.yaml" "$edit" || return 0
  write_component "$TMP/$name/rules.yaml" "$TMP/$name/prometheusrule.yaml"
  must_fail "$name" "$want" "$PYTHON" "$OBS/check-rules.py" --rules "$TMP/$name/rules.yaml" \
    --prometheusrule "$TMP/$name/prometheusrule.yaml" --tests "$TMP/$name/tests"
}
# A metric the server does not register.
broken_rules unknown-metric 's/attnserve_queue_depth \//attnserve_queue_length \//' \
  'reads attnserve_queue_length, which metrics.cc does not register'
# A runbook link to a section docs/operations.md does not have.
broken_rules missing-runbook 's/#attnservereplicadown$/#attnserve-replica-down/' \
  'anchor #attnserve-replica-down is no heading'
# An SLO threshold changed in one window only.
broken_rules split-threshold '0,/le="0\.5"}\[5m\]/s//le="1"}[5m]/' \
  'the four slow_ratio_rate rules must select one le bucket'

echo "observability_rules_test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
