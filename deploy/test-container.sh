#!/usr/bin/env bash
# The container test (make test-container): builds the repository's Dockerfile and runs the image, without a
# Docker engine. buildah (chroot isolation, vfs storage, so it needs no daemon, no overlayfs and no OCI
# runtime) builds the image; where docker.io/library/debian:bookworm-slim is not in local storage yet, it is
# made first with debootstrap from Debian's archive. Then the image's own entrypoint starts the server in a
# buildah container on loopback ports, with deploy/k8s/config.pbtxt (the Kubernetes ConfigMap's config)
# mounted at /etc/attnserve/config.pbtxt, and the test checks, from the host: health, an Infer with attnctl,
# /metrics, the image's HEALTHCHECK command run inside the container, the server's uid, a short attnbench
# load without errors, and that on SIGTERM the server answers every request it had accepted and exits 0.
# Everything it started (processes, working containers, temporary files) is removed on exit, also on
# failure, and so are untagged images (the build's cached layers, unless ATTNSERVE_KEEP_BUILD_CACHE=1); the
# base image and the built image stay in buildah's storage (`buildah --storage-driver vfs rmi IMAGE`).
#
# Needs root (buildah and debootstrap), buildah and debootstrap (scripts/install-deps.sh --container), and
# the host's build/tools/attnctl and attnbench (built here when missing).
# Environment: ATTNSERVE_IMAGE (default localhost/attnserve:test), ATTNSERVE_DEBIAN_MIRROR (default
# http://deb.debian.org/debian), BUILD (the host build directory, default build), ATTNSERVE_BUILD_JOBS
# (compile jobs in the image's build stage, default all cores), ATTNSERVE_UNIT_TESTS (1 runs the unit tests in
# the image's build stage; default 0, as `make test` runs them before this test in CI).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
IMAGE="${ATTNSERVE_IMAGE:-localhost/attnserve:test}"
BASE_IMAGE="docker.io/library/debian:bookworm-slim"
MIRROR="${ATTNSERVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BUILD_DIR="${BUILD:-build}"
ATTNCTL="$ROOT/$BUILD_DIR/tools/attnctl"
ATTNBENCH="$ROOT/$BUILD_DIR/tools/attnbench"
# vfs: works on any filesystem, also inside containers without overlayfs; every command names it so they all
# use the same store.
BUILDAH=(buildah --storage-driver vfs)
START=$SECONDS

log() { echo "test-container: $*" >&2; }
fail() { echo "test-container: FAIL: $*" >&2; exit 1; }

# ---- clean-up of everything this script starts, on success and on failure -------------------------------
TMP="$(mktemp -d "${TMPDIR:-/tmp}/attnserve-container-test.XXXXXX")"
CONTAINERS=()
RUN_PID=""
SERVER_PID=""
DRAIN_PIDS=()
cleanup() {
  local rc=$?
  set +e
  if [ "$rc" -ne 0 ] && [ -s "$TMP/server.log" ]; then
    echo "---- server log (last 40 lines) ----" >&2
    tail -n 40 "$TMP/server.log" >&2
  fi
  local p
  for p in "${DRAIN_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && kill -KILL "$p"; wait "$p" 2>/dev/null; done
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID"
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$SERVER_PID" 2>/dev/null && kill -KILL "$SERVER_PID"
  fi
  if [ -n "$RUN_PID" ] && kill -0 "$RUN_PID" 2>/dev/null; then
    kill -TERM "$RUN_PID"
    for _ in $(seq 50); do kill -0 "$RUN_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$RUN_PID" 2>/dev/null && kill -KILL "$RUN_PID"
  fi
  [ -n "$RUN_PID" ] && wait "$RUN_PID" 2>/dev/null
  local c
  for c in "${CONTAINERS[@]}"; do
    "${BUILDAH[@]}" umount "$c" >/dev/null 2>&1
    "${BUILDAH[@]}" rm "$c" >/dev/null 2>&1
  done
  rm -rf "$TMP"
  # Untagged images: the build's cached intermediate layers and a previous build of $IMAGE (vfs stores every
  # layer as a full copy, some GB per build). ATTNSERVE_KEEP_BUILD_CACHE=1 keeps them for a faster next run.
  if [ "${ATTNSERVE_KEEP_BUILD_CACHE:-0}" != 1 ]; then "${BUILDAH[@]}" rmi --prune >/dev/null 2>&1; fi
  log "total time $((SECONDS - START)) s"
  if [ "$rc" -eq 0 ]; then log "PASS"; else log "FAILED (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" -eq 0 ] || fail "needs root (buildah with chroot isolation, debootstrap)"
for tool in buildah debootstrap curl; do
  command -v "$tool" >/dev/null || fail "$tool is missing: run scripts/install-deps.sh --container"
done

# ---- host client binaries --------------------------------------------------------------------------------
if [ ! -x "$ATTNCTL" ] || [ ! -x "$ATTNBENCH" ]; then
  log "building the host's attnctl and attnbench in $BUILD_DIR"
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$BUILD_DIR" -j "${ATTNSERVE_BUILD_JOBS:-$(nproc)}" --target attnctl attnbench
fi

# ---- base image: debian:bookworm-slim from debootstrap when not in local storage -------------------------
if "${BUILDAH[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  log "base image $BASE_IMAGE: in local storage"
else
  log "base image $BASE_IMAGE: not in local storage, making it with debootstrap --variant=minbase bookworm"
  t0=$SECONDS
  rootfs="$TMP/rootfs"
  nice -n 10 debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$TMP/debootstrap.log" 2>&1 ||
    { tail -n 30 "$TMP/debootstrap.log" >&2; fail "debootstrap failed"; }
  # As the official slim image: bookworm, bookworm-updates and bookworm-security in deb822 form, no
  # documentation or translations installed by later apt-get runs, no apt caches or lists left in layers.
  rm -f "$rootfs/etc/apt/sources.list"
  security_mirror="${MIRROR%/debian}/debian-security"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security_mirror
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  printf 'Acquire::GzipIndexes "true";\nAcquire::CompressionTypes::Order:: "gz";\n' \
    >"$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
  printf 'APT::AutoRemove::SuggestsImportant "false";\n' >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
  find "$rootfs/usr/share/doc" -mindepth 2 -not -name copyright -not -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/{man,info,groff,lintian,linda,locale}/* \
         "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
         "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/* "$rootfs"/var/tmp/*
  : >"$rootfs/etc/machine-id"   # a container gets its own
  c=$("${BUILDAH[@]}" from scratch)
  CONTAINERS+=("$c")
  mnt=$("${BUILDAH[@]}" mount "$c")
  cp -a "$rootfs/." "$mnt/"
  "${BUILDAH[@]}" umount "$c" >/dev/null
  "${BUILDAH[@]}" config --os linux --arch amd64 \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd '["bash"]' \
    --label org.opencontainers.image.description="Debian bookworm minbase (debootstrap), for attnserve's container test" \
    "$c"
  "${BUILDAH[@]}" commit --quiet --format docker --rm "$c" "$BASE_IMAGE" >/dev/null
  CONTAINERS=()
  rm -rf "$rootfs"
  log "base image $BASE_IMAGE: committed ($(( SECONDS - t0 )) s, $("${BUILDAH[@]}" images --format '{{.Size}}' "$BASE_IMAGE"))"
fi

# ---- build the Dockerfile ---------------------------------------------------------------------------------
# --format docker: the OCI image format has no HEALTHCHECK. --network host: the RUN steps' apt-get reaches
# Debian's archive through the host's network. --layers: with ATTNSERVE_KEEP_BUILD_CACHE=1 the next run
# reuses the unchanged steps (apt-get, and the compile when the sources are the same).
log "building $IMAGE from Dockerfile"
t0=$SECONDS
revision="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
# The image's version label is the project's version (project(attnserve VERSION ...)), as --version prints.
version="$(sed -n 's/^project(attnserve VERSION \([0-9.]*\).*/\1/p' "$ROOT/CMakeLists.txt")"
# The full log goes to a file; the steps, the unit tests' results and errors are shown as they come.
if ! nice -n 10 "${BUILDAH[@]}" bud --isolation chroot --pull=never --network host --format docker --layers \
    --force-rm --jobs 1 --build-arg "JOBS=${ATTNSERVE_BUILD_JOBS:-}" --build-arg "UNIT_TESTS=${ATTNSERVE_UNIT_TESTS:-0}" --build-arg "REVISION=$revision" \
    --build-arg "VERSION=${version:-unknown}" \
    -f Dockerfile -t "$IMAGE" . 2>&1 | tee "$TMP/build.log" |
    { grep --line-buffered -E '^(STEP|COMMIT|Successfully)|Test +#|tests passed|FAILED|error|Error' >&2 || true; }; then
  tail -n 60 "$TMP/build.log" >&2
  fail "buildah bud failed"
fi
size=$("${BUILDAH[@]}" images --format '{{.Size}}' "$IMAGE")
log "built $IMAGE in $(( SECONDS - t0 )) s: runtime image size $size"
if summary=$(grep -E '[0-9]+% tests passed' "$TMP/build.log"); then
  log "build stage unit tests: $(tail -n 1 <<<"$summary")"
elif grep -q 'Using cache' "$TMP/build.log"; then
  log "build stage unit tests: not run, the build step came from the layer cache (they passed when it was made)"
else
  fail "the build stage's unit test summary is missing from the build log"
fi

# ---- the image's configuration ----------------------------------------------------------------------------
cfg() { "${BUILDAH[@]}" inspect --type image --format "$1" "$IMAGE"; }
user=$(cfg '{{.Docker.Config.User}}')
[ "$user" = "10001:10001" ] || [ "$user" = "10001" ] || fail "image USER is '$user', expected 10001"
ports=$(cfg '{{range $p, $v := .Docker.Config.ExposedPorts}}{{$p}} {{end}}')
case "$ports" in *50051/tcp*9464/tcp*) ;; *) fail "image exposes '$ports', expected 50051/tcp and 9464/tcp" ;; esac
mapfile -t entrypoint < <(cfg '{{range .Docker.Config.Entrypoint}}{{println .}}{{end}}' | sed '/^$/d')
((${#entrypoint[@]})) || fail "image has no ENTRYPOINT"
healthcheck=$(cfg '{{if .Docker.Config.Healthcheck}}{{range .Docker.Config.Healthcheck.Test}}{{println .}}{{end}}{{end}}')
[ -n "$healthcheck" ] || fail "image has no HEALTHCHECK"
[ -n "$(cfg '{{index .Docker.Config.Labels "org.opencontainers.image.version"}}')" ] ||
  fail "image has no org.opencontainers.image.version label"
log "image: user $user, exposes $ports, entrypoint ${entrypoint[*]}, healthcheck $(echo "$healthcheck" | tr '\n' ' ')"

# ---- run the server from the image ------------------------------------------------------------------------
ctr=$("${BUILDAH[@]}" from --pull=never --quiet "$IMAGE")
CONTAINERS+=("$ctr")
# The ConfigMap's config, mounted where the entrypoint looks for it; the ports come from the environment (the
# config file's 0.0.0.0:50051 would clash with anything else on the machine): port 0 picks free ones.
cp deploy/k8s/config.pbtxt "$TMP/config.pbtxt"
chmod 0644 "$TMP/config.pbtxt"
log "starting the server: buildah run --isolation chroot $ctr -- ${entrypoint[*]}"
"${BUILDAH[@]}" run --isolation chroot --network host \
  --volume "$TMP/config.pbtxt:/etc/attnserve/config.pbtxt:ro" \
  --env ATTNSERVE_GRPC_ADDRESS=127.0.0.1:0 --env ATTNSERVE_METRICS_ADDRESS=127.0.0.1:0 \
  "$ctr" -- "${entrypoint[@]}" >"$TMP/server.log" 2>&1 &
RUN_PID=$!

# The attnserve process: a descendant of buildah run (buildah's chroot helper sits between them).
descendants() {
  ps -e -o pid=,ppid=,comm= | awk -v root="$1" '
    { pid[NR] = $1; ppid[NR] = $2; comm[NR] = $3 }
    END { inset[root] = 1; changed = 1
          while (changed) { changed = 0
            for (i = 1; i <= NR; i++) if (!(pid[i] in inset) && (ppid[i] in inset)) { inset[pid[i]] = 1; changed = 1 } }
          for (i = 1; i <= NR; i++) if (pid[i] != root && (pid[i] in inset)) print pid[i], comm[i] }'
}
grpc_port="" metrics_port=""
for _ in $(seq 600); do
  if line=$(grep -m1 -o 'ready: grpc_port=[0-9]* metrics_port=[0-9]*' "$TMP/server.log"); then
    grpc_port=$(sed -E 's/.*grpc_port=([0-9]+).*/\1/' <<<"$line")
    metrics_port=$(sed -E 's/.*metrics_port=([0-9]+).*/\1/' <<<"$line")
    break
  fi
  kill -0 "$RUN_PID" 2>/dev/null || fail "the server exited before it was ready"
  sleep 0.1
done
[ -n "$grpc_port" ] || fail "no 'ready:' line from the server within 60 s"
SERVER_PID=$(descendants "$RUN_PID" | awk '$2 == "attnserve" { print $1; exit }')
[ -n "$SERVER_PID" ] || fail "cannot find the attnserve process under buildah run (pid $RUN_PID)"
server_uid=$(awk '/^Uid:/ { print $2 }' "/proc/$SERVER_PID/status")
log "server ready: pid $SERVER_PID, uid $server_uid, grpc 127.0.0.1:$grpc_port, metrics 127.0.0.1:$metrics_port"
[ "$server_uid" = 10001 ] || fail "the server runs as uid $server_uid, expected 10001"

# ---- health, Infer, metrics, HEALTHCHECK --------------------------------------------------------------------
target="127.0.0.1:$grpc_port"
for i in $(seq 50); do
  if "$ATTNCTL" --target "$target" health >"$TMP/health.out" 2>&1; then break; fi
  [ "$i" -lt 50 ] || { cat "$TMP/health.out" >&2; fail "attnctl health did not report SERVING"; }
  sleep 0.2
done
log "attnctl health: $(tr '\n' ' ' <"$TMP/health.out")"

"$ATTNCTL" --target "$target" list >"$TMP/layers.out" 2>&1 || { cat "$TMP/layers.out" >&2; fail "attnctl list failed"; }
grep -q "encoder" "$TMP/layers.out" || { cat "$TMP/layers.out" >&2; fail "the mounted config's layer 'encoder' is not served"; }
log "attnctl list:"
sed 's/^/    /' "$TMP/layers.out" >&2

"$ATTNCTL" --target "$target" infer encoder --batch 2 --seq 8 >"$TMP/infer.out" 2>&1 ||
  { cat "$TMP/infer.out" >&2; fail "attnctl infer failed"; }
log "attnctl infer encoder --batch 2 --seq 8:"
sed 's/^/    /' "$TMP/infer.out" >&2

curl -fsS --max-time 10 "http://127.0.0.1:$metrics_port/metrics" >"$TMP/metrics.txt" || fail "GET /metrics failed"
grep -E '^attnserve_requests_total\{.*layer="encoder".*\} [1-9]' "$TMP/metrics.txt" >&2 ||
  fail "/metrics has no attnserve_requests_total for layer encoder"
grep -q '^attnserve_flops_total{layer="encoder"} [1-9]' "$TMP/metrics.txt" || fail "/metrics has no attnserve_flops_total for encoder"
log "/metrics: $(grep -c '^attnserve_' "$TMP/metrics.txt") attnserve_ samples"

# The image's HEALTHCHECK command, run inside the running container as Docker would (it reads the gRPC port
# from ATTNSERVE_GRPC_ADDRESS, as the server does).
mapfile -t hc <<<"$healthcheck"
case "${hc[0]}" in
  CMD-SHELL) hc_cmd=(/bin/sh -c "${hc[1]}") ;;
  CMD) hc_cmd=("${hc[@]:1}") ;;
  *) fail "unexpected HEALTHCHECK form '${hc[0]}'" ;;
esac
"${BUILDAH[@]}" run --isolation chroot --network host --env "ATTNSERVE_GRPC_ADDRESS=0.0.0.0:$grpc_port" \
  "$ctr" -- "${hc_cmd[@]}" >"$TMP/hc.out" 2>&1 || { cat "$TMP/hc.out" >&2; fail "the image's HEALTHCHECK failed"; }
log "HEALTHCHECK inside the container: $(tr '\n' ' ' <"$TMP/hc.out")"

# ---- load: attnbench, no errors --------------------------------------------------------------------------
"$ATTNBENCH" --target "$target" --layer encoder --batch 1 --seq 64 --concurrency 4 --warmup 500ms --duration 3s \
  --json --quiet >"$TMP/bench.json" 2>"$TMP/bench.err" || { cat "$TMP/bench.err" >&2; fail "attnbench failed"; }
node -e '
  const s = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"))[0];
  console.error(`test-container: attnbench encoder L=64 c=4 3s: ${s.requests} requests, ${s.ok} ok, ` +
    `${s.requests_per_second.toFixed(1)} req/s, p50 ${s.latency_ms.p50.toFixed(2)} ms, p99 ${s.latency_ms.p99.toFixed(2)} ms, ` +
    `mean batch ${s.server.batch_size.mean.toFixed(2)}, errors ${JSON.stringify(s.errors_by_code)}`);
  process.exit(s.ok > 0 && s.errors === 0 ? 0 : 1);
' "$TMP/bench.json" || fail "attnbench saw errors"

# ---- SIGTERM: every accepted request is answered, then exit 0 ----------------------------------------------
# Six requests of ~0.1-0.3 s compute each; SIGTERM goes once the server has accepted all six (in flight +
# answered since now = 6) while some are still queued, and each must still get its answer.
scrape() { curl -fsS --max-time 5 "http://127.0.0.1:$metrics_port/metrics"; }
metric() { scrape | awk -v m="$1" '$1 == m { print $2 }'; }
# Both counts from one scrape: from two, a request answered between them would count twice.
metric_in() { awk -v m="$1" '$1 == m { print $2 }' <<<"$2"; }
ok_metric='attnserve_requests_total{code="OK",layer="encoder",version="1"}'
ok_before=$(metric "$ok_metric")
DRAIN_PIDS=()
for i in 1 2 3 4 5 6; do
  "$ATTNCTL" --target "$target" --timeout-ms 60000 infer encoder --batch 2 --seq 1024 --seed "$i" \
    >"$TMP/drain.$i.out" 2>&1 &
  DRAIN_PIDS+=($!)
done
accepted=0 inflight=0
for _ in $(seq 400); do
  page=$(scrape)
  inflight=$(metric_in attnserve_inflight_requests "$page"); inflight=${inflight%.*}
  answered=$(metric_in "$ok_metric" "$page"); answered=$(( ${answered%.*} - ${ok_before%.*} ))
  accepted=$(( inflight + answered ))
  [ "$accepted" -ge 6 ] && break
  sleep 0.05
done
[ "$accepted" -ge 6 ] || fail "the server did not accept the six drain requests (accepted $accepted)"
log "SIGTERM to the server (pid $SERVER_PID) with $inflight of 6 requests in flight"
kill -TERM "$SERVER_PID"
rc=0
wait "$RUN_PID" || rc=$?
RUN_PID=""
SERVER_PID=""
lost=0
for i in 1 2 3 4 5 6; do
  if ! wait "${DRAIN_PIDS[$((i - 1))]}"; then lost=$((lost + 1)); sed "s/^/    request $i: /" "$TMP/drain.$i.out" >&2; fi
done
DRAIN_PIDS=()
log "server log, last lines:"
grep -E 'received SIG|stopped after|grace' "$TMP/server.log" | tail -n 3 | sed 's/^/    /' >&2
[ "$rc" -eq 0 ] || fail "the server exited $rc after SIGTERM, expected 0"
[ "$lost" -eq 0 ] || fail "$lost of the 6 requests in flight at SIGTERM got no answer"
[ "$inflight" -ge 2 ] || log "note: only $inflight request(s) were still in flight at SIGTERM"
grep -q 'draining' "$TMP/server.log" || fail "no 'draining' in the server log"
grep -q 'stopped after' "$TMP/server.log" || fail "no 'stopped after' in the server log"
log "server drained ($inflight requests in flight at SIGTERM, all answered) and exited 0; image $IMAGE ($size)"
