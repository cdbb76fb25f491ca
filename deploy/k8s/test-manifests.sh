#!/usr/bin/env bash
# ctest k8s_manifests_test (label unit, run by `make test`): renders deploy/k8s, alone and with the
# servicemonitor component, and validates every object against the Kubernetes schemas with unknown fields
# refused (deploy/k8s/validate/validate.mjs). Then proves the validator fails on deliberately broken copies:
# an unknown field, a wrong type, an unknown field of the ServiceMonitor, a broken reference.
#
# Renderer: `kubectl kustomize` where kubectl is on PATH ($KUBECTL; empty: none) (kubectl 1.21+ for the component, whose kustomize
# knows components); otherwise `validate.mjs --render`, which lists the kustomization's files. Where kubectl
# renders, the fallback's objects are compared with its output, so the fallback stays true.
# Needs Node.js and deploy/k8s/validate/node_modules (scripts/install-deps.sh runs `npm ci` there).
set -euo pipefail
cd "$(dirname "$0")/../.."
K8S=deploy/k8s
VALIDATE=(node "$K8S/validate/validate.mjs")
ALL_KINDS=Deployment,ConfigMap,Service,HorizontalPodAutoscaler,PodDisruptionBudget

passed=0 failed=0
ok() { echo "ok: $*"; passed=$((passed + 1)); }
bad() { echo "FAIL: $*" >&2; failed=$((failed + 1)); }

command -v node >/dev/null || { echo "k8s_manifests_test: node is missing: run scripts/install-deps.sh" >&2; exit 1; }
[ -d "$K8S/validate/node_modules/kubernetes-models" ] ||
  { echo "k8s_manifests_test: $K8S/validate/node_modules is missing: run scripts/install-deps.sh" >&2; exit 1; }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/attnserve-k8s-test.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# An overlay adding the component, as a user would write it (kustomize wants relative paths).
mkdir -p "$TMP/overlay"
rel="$(realpath --relative-to="$TMP/overlay" "$K8S")"
cat >"$TMP/overlay/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $rel
components:
  - $rel/components/servicemonitor
EOF

# KUBECTL= (empty) forces the fallback.
KUBECTL="${KUBECTL-kubectl}"
kubectl_minor=""
if [ -n "$KUBECTL" ] && command -v "$KUBECTL" >/dev/null; then
  kubectl_minor="$("$KUBECTL" version --client -o json 2>/dev/null |
    node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{try{console.log(parseInt(JSON.parse(s).clientVersion.minor,10)||"")}catch{console.log("")}})')"
fi

# render NAME DIR [needs-components]: kubectl kustomize when it can, else the fallback.
render() {
  local name=$1 dir=$2 components=${3:-}
  "${VALIDATE[@]}" --render "$dir" >"$TMP/$name.fallback.yaml"
  if [ -n "$kubectl_minor" ] && { [ -z "$components" ] || [ "$kubectl_minor" -ge 21 ]; }; then
    if ! "$KUBECTL" kustomize "$dir" >"$TMP/$name.yaml" 2>"$TMP/$name.err"; then
      cat "$TMP/$name.err" >&2
      bad "kubectl kustomize $name"
      return 1
    fi
    echo "rendered $name with kubectl kustomize (kubectl 1.$kubectl_minor)"
    # The fallback lists the same objects (kustomize adds a hash to generated ConfigMap names).
    local a b
    a="$(node "$K8S/validate/list-objects.mjs" "$TMP/$name.yaml")"
    b="$(node "$K8S/validate/list-objects.mjs" "$TMP/$name.fallback.yaml")"
    if [ "$a" = "$b" ]; then ok "$name: the fallback renderer lists the same objects as kustomize"; else
      bad "$name: the fallback renderer differs from kustomize"; diff <(echo "$a") <(echo "$b") >&2 || true
    fi
  else
    cp "$TMP/$name.fallback.yaml" "$TMP/$name.yaml"
    echo "rendered $name from the kustomization's files (no kubectl${kubectl_minor:+ 1.21+ for components})"
  fi
}

# validate NAME FILE EXPECTED-KINDS
validate() {
  if "${VALIDATE[@]}" --expect "$3" "$2" >"$TMP/$1.out" 2>&1; then
    sed 's/^/  /' "$TMP/$1.out"
    ok "$1: every object valid"
  else
    sed 's/^/  /' "$TMP/$1.out" >&2
    bad "$1: invalid"
  fi
}

render base "$K8S" && validate base "$TMP/base.yaml" "$ALL_KINDS"
render servicemonitor "$TMP/overlay" components &&
  validate servicemonitor "$TMP/servicemonitor.yaml" "$ALL_KINDS,ServiceMonitor"

# must_fail NAME SED-SCRIPT EXPECTED-MESSAGE: a broken copy of the rendered overlay that must be refused with
# a message naming the problem.
must_fail() {
  local name=$1 script=$2 expected=$3
  sed "$script" "$TMP/servicemonitor.yaml" >"$TMP/$name.yaml"
  if cmp -s "$TMP/servicemonitor.yaml" "$TMP/$name.yaml"; then bad "$name: the sed script changed nothing"; return; fi
  if "${VALIDATE[@]}" "$TMP/$name.yaml" >"$TMP/$name.out" 2>&1; then
    bad "$name: the validator accepted it"
  elif grep -qF -- "$expected" "$TMP/$name.out"; then
    ok "$name: refused: $(grep -F -- "$expected" "$TMP/$name.out" | head -n 1 | sed 's/^error: [^:]*: //')"
  else
    cat "$TMP/$name.out" >&2
    bad "$name: refused, but without '$expected'"
  fi
}
if [ -s "$TMP/servicemonitor.yaml" ]; then
  must_fail unknown-field 's/^\( *\)readOnlyRootFilesystem: true$/&\n\1readOnlyRootFileSystem: true/' \
    'securityContext.readOnlyRootFileSystem: unknown field "readOnlyRootFileSystem"'
  must_fail unknown-top-level-field 's/^\( *\)terminationGracePeriodSeconds: 45$/&\n\1terminationGraceSeconds: 45/' \
    'spec.template.spec.terminationGraceSeconds: unknown field'
  must_fail wrong-type 's/^  replicas: 2$/  replicas: "2"/' 'spec.replicas: must be integer'
  must_fail wrong-type-nested 's/^\( *\)averageUtilization: 70$/\1averageUtilization: high/' \
    'spec.metrics[0].resource.target.averageUtilization: must be integer'
  must_fail servicemonitor-unknown-field 's/^\( *\)scrapeTimeout: 10s$/&\n\1scrapeTimeot: 10s/' \
    'spec.endpoints[0].scrapeTimeot: unknown field'
  must_fail unknown-kind 's/^kind: PodDisruptionBudget$/kind: PodDisruptionBudgett/' 'no schema for apiVersion policy/v1'
  must_fail short-grace 's/^\( *\)terminationGracePeriodSeconds: 45$/\1terminationGracePeriodSeconds: 30/' \
    'terminationGracePeriodSeconds 30 must exceed'
  must_fail wrong-port-name 's/^\( *\)targetPort: metrics$/\1targetPort: metric/' 'targetPort metric is not a named container port'
fi

echo "k8s_manifests_test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
