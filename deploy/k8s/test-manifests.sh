#!/usr/bin/env bash
# ctest k8s_manifests_test (label unit, run by `make test`): renders deploy/k8s, alone and with its
# components (servicemonitor, prometheusrule, networkpolicy, secure, and these together with
# servicemonitor-basicauth), and
# validates every object against the Kubernetes schemas with unknown fields refused
# (deploy/k8s/validate/validate.mjs), as well as the example Secrets of components/secure. Then proves the
# validator fails on deliberately broken copies: unknown fields (Deployment, ServiceMonitor, PrometheusRule,
# NetworkPolicy),
# wrong types, broken references, a gRPC probe on the TLS port, a Secret mounted with subPath, a server file
# outside every mount.
#
# Renderer: `kubectl kustomize` where kubectl is on PATH ($KUBECTL; empty: none) (kubectl 1.21+ for the
# components, whose kustomize knows components); otherwise `validate.mjs --render`, which lists the
# kustomization's files and applies its JSON 6902 patches. Where kubectl renders, the fallback's objects are
# compared with its output, so the fallback stays true.
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

# overlay NAME COMPONENT...: an overlay of the base adding the components in that order, as a user would write
# it (kustomize wants relative paths).
overlay() {
  local name=$1 c rel
  shift
  mkdir -p "$TMP/$name"
  rel="$(realpath --relative-to="$TMP/$name" "$K8S")"
  {
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %s\ncomponents:\n' "$rel"
    for c in "$@"; do printf '  - %s/components/%s\n' "$rel" "$c"; done
  } >"$TMP/$name/kustomization.yaml"
}
overlay overlay servicemonitor
overlay overlay-prometheusrule servicemonitor prometheusrule
overlay overlay-networkpolicy networkpolicy
overlay overlay-secure secure
overlay overlay-secure-servicemonitor servicemonitor secure servicemonitor-basicauth
overlay overlay-full networkpolicy servicemonitor prometheusrule secure servicemonitor-basicauth
overlay overlay-session-proxy session-proxy

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

# has NAME FILE WHAT PATTERN / lacks NAME FILE WHAT PATTERN: what the schemas cannot tell, e.g. that a
# component's patch applied (kustomize skips a JSON patch whose target is missing, as when
# servicemonitor-basicauth is listed before servicemonitor).
has() {
  if grep -q -- "$4" "$2"; then ok "$1: $3"; else bad "$1: not $3 (no line matches '$4')"; fi
}
lacks() {
  if ! grep -q -- "$4" "$2"; then ok "$1: $3"; else bad "$1: not $3 ('$4' is there)"; fi
}

render base "$K8S" && validate base "$TMP/base.yaml" "$ALL_KINDS" &&
  lacks base "$TMP/base.yaml" "no NetworkPolicy in the base (an opt-in component)" '^kind: NetworkPolicy$'
render servicemonitor "$TMP/overlay" components &&
  validate servicemonitor "$TMP/servicemonitor.yaml" "$ALL_KINDS,ServiceMonitor" &&
  has servicemonitor "$TMP/servicemonitor.yaml" "the scrape job is named from app.kubernetes.io/name (attnserve)" \
    '^ *jobLabel: app.kubernetes.io/name$'
# The rules' own checks (promtool, the same groups as deploy/observability/rules.yaml) are
# deploy/observability/test-rules.sh's; here the PrometheusRule is validated as a Kubernetes object.
if render prometheusrule "$TMP/overlay-prometheusrule" components; then
  validate prometheusrule "$TMP/prometheusrule.yaml" "$ALL_KINDS,ServiceMonitor,PrometheusRule"
  has prometheusrule "$TMP/prometheusrule.yaml" "the replica-down alert selects the ServiceMonitor's job" \
    'up{job="attnserve"} == 0'
fi
render networkpolicy "$TMP/overlay-networkpolicy" components &&
  validate networkpolicy "$TMP/networkpolicy.yaml" "$ALL_KINDS,NetworkPolicy"
if render secure "$TMP/overlay-secure" components; then
  validate secure "$TMP/secure.yaml" "$ALL_KINDS"
  has secure "$TMP/secure.yaml" "probes on the plaintext health port" '^ *port: 8081$'
  lacks secure "$TMP/secure.yaml" "the gRPC Service no longer says h2c" 'kubernetes.io/h2c'
fi
if render secure-servicemonitor "$TMP/overlay-secure-servicemonitor" components; then
  validate secure-servicemonitor "$TMP/secure-servicemonitor.yaml" "$ALL_KINDS,ServiceMonitor"
  has secure-servicemonitor "$TMP/secure-servicemonitor.yaml" "the ServiceMonitor sends basic auth" '^ *\(- \)\{0,1\}basicAuth:$'
fi
if render session-proxy "$TMP/overlay-session-proxy" components; then
  validate session-proxy "$TMP/session-proxy.yaml" "$ALL_KINDS"
  has session-proxy "$TMP/session-proxy.yaml" "the proxy's Deployment" '^  name: attnserve-session-proxy$'
  has session-proxy "$TMP/session-proxy.yaml" "the proxy's pods labelled as the NetworkPolicy's clients" \
    '^ *attnserve-client: "true"$'
fi
if render full "$TMP/overlay-full" components; then
  validate full "$TMP/full.yaml" "$ALL_KINDS,ServiceMonitor,PrometheusRule,NetworkPolicy"
  has full "$TMP/full.yaml" "the ServiceMonitor sends basic auth" '^ *\(- \)\{0,1\}basicAuth:$'
fi
# The example Secrets are documentation, outside every kustomization; they still have to be valid Secrets.
validate example-secrets "$K8S/components/secure/examples/secrets.example.yaml" Secret

# must_fail NAME SED-SCRIPT EXPECTED-MESSAGE [RENDER]: a broken copy of a rendered overlay (default: the
# servicemonitor one) that must be refused with a message naming the problem.
must_fail() {
  local name=$1 script=$2 expected=$3 from="$TMP/${4:-servicemonitor}.yaml"
  if [ ! -s "$from" ]; then bad "$name: $from was not rendered"; return; fi
  sed "$script" "$from" >"$TMP/$name.yaml"
  if cmp -s "$from" "$TMP/$name.yaml"; then bad "$name: the sed script changed nothing"; return; fi
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
# An unknown field in an alert rule (`fore` beside the first `for`; PrometheusRule rules are maps, so only
# the strict check catches it).
if [ -s "$TMP/prometheusrule.yaml" ]; then
  must_fail prometheusrule-unknown-field '0,/^\( *\)for: \(.*\)$/s//\1for: \2\n\1fore: \2/' \
    'rules[4].fore: unknown field "fore"' prometheusrule
fi
# Broken copies of the overlay with every component. Key order differs between kubectl's output (sorted) and
# the fallback's (as written): the scripts match both.
if [ -s "$TMP/full.yaml" ]; then
  must_fail networkpolicy-unknown-field 's/^\( *\)policyTypes:$/\1policyType:/' \
    'spec.policyType: unknown field "policyType"' full
  must_fail networkpolicy-wrong-port 's/^\( *\(- \)\{0,1\}\)port: grpc$/\1port: grcp/' \
    'NetworkPolicy/attnserve: ingress[0]: port grcp is not a named container port' full
  must_fail tls-probe-on-grpc-port 's/^\( *\)port: 8081$/\1port: 50051/' \
    "readinessProbe is a gRPC probe on the TLS port 50051: the kubelet's gRPC probe cannot do TLS" full
  must_fail secret-subpath \
    's|^\( *\)- mountPath: /etc/attnserve-tls$|&\n\1  subPath: tls.crt|;t;s|^\( *\)mountPath: /etc/attnserve-tls$|&\n\1subPath: tls.crt|' \
    'volumeMount tls (Secret) uses subPath: updates of the Secret never reach a subPath mount' full
  must_fail file-not-mounted 's|--auth-token-file=/etc/attnserve-auth/tokens$|--auth-token-file=/etc/atnserve-auth/tokens|' \
    '--auth-token-file /etc/atnserve-auth/tokens is not under any volumeMount' full
  must_fail basicauth-unknown-field 's/^\( *\(- \)\{0,1\}\)basicAuth:$/\1basicauth:/' \
    'spec.endpoints[0].basicauth: unknown field "basicauth"' full
fi

echo "k8s_manifests_test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
