#!/usr/bin/env bash
# Installs every build, test and run dependency of attnserve from Debian 12's archive (and npm for the
# Node example). Idempotent: packages already present are skipped, so a second run costs a dpkg query.
# Usage: scripts/install-deps.sh [--bench]   (--bench: kept for old scripts, PyTorch is always installed now;
# --container, --tsan and --fuzz add what those make targets need, see below)
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PKGS=(
  build-essential cmake pkg-config ninja-build
  libdnnl-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libspdlog-dev libfmt-dev prometheus-cpp-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libabsl-dev nlohmann-json3-dev
  python3 python3-numpy python3-grpcio python3-protobuf python3-cryptography python3-yaml
  prometheus curl procps
  libssl-dev openssl
  # The Python client package (client/python: a venv, pip with no index) and its remote decoder example,
  # which compares with the same PyTorch model run locally (OpenBLAS: torch's reference BLAS is ~50x slower).
  python3-venv python3-pip python3-setuptools python3-wheel python3-torch libopenblas0-pthread
  # The session proxy's test (deploy/session-proxy): nginx with HTTP/2 and grpc_pass.
  nginx-light
  # The dashboard drawn without a Grafana (bench/dashboard_png.py, also run by tests/integration/dashboard_test.py).
  python3-matplotlib
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

# Node.js and npm: the machine image may ship its own build (which conflicts with Debian's npm package);
# only install Debian's when no npm is on PATH.
if ! command -v npm >/dev/null 2>&1; then missing+=(nodejs npm); fi

if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # Packages with a daemon (nginx) must not start it: the tests start their own on loopback ports. A
  # policy-rc.d that says "no" is Debian's way; one already present is left alone.
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    trap '$SUDO rm -f "$policy"' EXIT
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
  fi
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  if [ -n "$policy" ]; then $SUDO rm -f "$policy"; trap - EXIT; fi
else
  echo "install-deps: all Debian packages present"
fi

# The Node example's npm packages (examples/node, pinned by its package-lock.json), run by the examples test.
# Installed again only when node_modules is missing or older than the lock file.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE_EXAMPLE="$REPO_ROOT/examples/node"
if [ ! -d "$NODE_EXAMPLE/node_modules" ] || [ "$NODE_EXAMPLE/package-lock.json" -nt "$NODE_EXAMPLE/node_modules" ]; then
  echo "install-deps: npm ci in examples/node"
  npm ci --prefix "$NODE_EXAMPLE" --no-audit --no-fund
else
  echo "install-deps: examples/node/node_modules up to date"
fi

# --container (make test-container): buildah and debootstrap, which build and run the Dockerfile's image
# without a Docker engine (deploy/test-container.sh). Only that target installs them.
if [ "${1:-}" = "--container" ]; then
  container_missing=()
  for p in buildah debootstrap; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      container_missing+=("$p")
    fi
  done
  if ((${#container_missing[@]})); then
    echo "install-deps: installing ${container_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${container_missing[@]}"
  fi
fi

# --fuzz (make fuzz): clang 14 with its sanitizer and libFuzzer runtimes (libclang-rt-14-dev), and LLVM's
# OpenMP (libomp-14-dev: clang's omp.h, which the engine's sources include).
if [ "${1:-}" = "--fuzz" ]; then
  fuzz_missing=()
  for p in clang-14 libclang-rt-14-dev libomp-14-dev; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      fuzz_missing+=("$p")
    fi
  done
  if ((${#fuzz_missing[@]})); then
    echo "install-deps: installing ${fuzz_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${fuzz_missing[@]}"
  fi
fi

# --tsan (make test-tsan): abseil's own sources, as Debian ships them (apt-get source, from Debian's archive),
# for the ThreadSanitizer build. Debian's libabsl is not built for TSan, so absl::Mutex would be invisible to
# it and every mutex-protected access would be reported; the TSan build compiles abseil's synchronization
# sources instrumented into the test binaries instead (CMakeLists.txt, ATTNSERVE_ABSEIL_SOURCE_DIR). The
# source version is the installed libabsl-dev's, unpacked once into build-deps/abseil-src.
if [ "${1:-}" = "--tsan" ]; then
  ABSEIL_DIR="$REPO_ROOT/build-deps/abseil-src"
  if [ ! -f "$ABSEIL_DIR/absl/synchronization/mutex.cc" ]; then
    if ! dpkg-query -W -f='${Status}' dpkg-dev 2>/dev/null | grep -q "install ok installed"; then
      $SUDO apt-get install -y -qq --no-install-recommends dpkg-dev
    fi
    SRC_LIST=/etc/apt/sources.list.d/attnserve-debian-src.sources
    if ! grep -rqs '^Types: deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
      printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb-src\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' |
        $SUDO tee "$SRC_LIST" >/dev/null
      $SUDO apt-get update -qq
    fi
    version="$(dpkg-query -W -f='${source:Version}' libabsl-dev)"
    work="$(mktemp -d)"
    echo "install-deps: apt-get source abseil=$version"
    (cd "$work" && apt-get source -qq "abseil=$version" >/dev/null 2>&1 || apt-get source -qq abseil >/dev/null)
    mkdir -p "$REPO_ROOT/build-deps"
    rm -rf "$ABSEIL_DIR"
    mv "$work"/abseil-*/ "$ABSEIL_DIR"
    rm -rf "$work"
  fi
fi

# kubectl, whose `kubectl kustomize` renders deploy/k8s for its test (k8s_manifests_test): Debian's
# kubernetes-client only where no kubectl is on PATH (a kubectl the machine already has is newer, and its
# package would conflict with Debian's). Without any, the test renders the kustomization's listed files.
if ! command -v kubectl >/dev/null 2>&1; then
  echo "install-deps: installing kubernetes-client (kubectl)"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends kubernetes-client
fi

# The Kubernetes manifests' validator (deploy/k8s/validate: kubernetes-models, yaml, typescript): npm ci when
# its node_modules is missing or older than its package-lock.json.
k8s_validate_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/deploy/k8s/validate"
if [ -f "$k8s_validate_dir/package-lock.json" ] &&
   { [ ! -f "$k8s_validate_dir/node_modules/.package-lock.json" ] ||
     [ "$k8s_validate_dir/package-lock.json" -nt "$k8s_validate_dir/node_modules/.package-lock.json" ]; }; then
  echo "install-deps: npm ci in deploy/k8s/validate"
  npm ci --prefix "$k8s_validate_dir" --no-audit --no-fund --loglevel=error
fi
