# attnserve's container image.
#
#   docker build -t attnserve:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9464:9464 attnserve:0.1.0                    # the embedded default config
#   docker run --rm -p 50051:50051 -p 9464:9464 \
#     -v "$PWD/my.pbtxt:/etc/attnserve/config.pbtxt:ro" attnserve:0.1.0           # a mounted config
#
# Two stages on debian:bookworm-slim: `build` installs Debian's build dependencies, builds Release and runs
# the unit tests (a failing test fails the build); the runtime stage has only the runtime libraries, the
# attnserve, attnctl and attnbench binaries and a non-root user. Without Docker: deploy/test-container.sh
# builds and runs this file with buildah (make test-container).
ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# The build dependencies of scripts/install-deps.sh (without its test-only Python and Prometheus packages).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake ninja-build pkg-config \
      libdnnl-dev \
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
      libspdlog-dev libfmt-dev prometheus-cpp-dev \
      libgtest-dev libgmock-dev libbenchmark-dev \
      libabsl-dev nlohmann-json3-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The unit tests (ctest label `unit`), less k8s_manifests_test and structure_test: they check deploy/k8s and
# the source layout with Node.js, kubectl and Python, which are not part of this image's build, and run in
# `make test`. UNIT_TESTS=0 builds only the three binaries and runs no test: deploy/test-container.sh passes
# it because `make test` has just run the same tests against the same Debian packages.
ARG JOBS=
ARG UNIT_TESTS=1
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
 && if [ "$UNIT_TESTS" = 0 ]; then \
      cmake --build build -j "${JOBS:-$(nproc)}" --target attnserve attnctl attnbench; \
    else \
      cmake --build build -j "${JOBS:-$(nproc)}" \
      && (cd build && ctest -L unit -E '^(k8s_manifests_test|structure_test)$' --output-on-failure -j 1); \
    fi \
 && strip --strip-unneeded build/server/attnserve build/tools/attnctl build/tools/attnbench

FROM ${DEBIAN_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
# Runtime libraries only (`ldd build/server/attnserve`, mapped to packages with `dpkg -S`); each pulls its
# own dependencies (libgrpc29, libre2-9, libc-ares2, libssl3, libcivetweb1, ocl-icd-libopencl1, ...).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libdnnl2 libgomp1 \
      libgrpc++1.51 libprotobuf32 libabsl20220623 \
      libspdlog1.10 libfmt9 \
      libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && groupadd --system --gid 10001 attnserve \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin attnserve
COPY --from=build /src/build/server/attnserve /src/build/tools/attnctl /src/build/tools/attnbench /usr/local/bin/
# Every binary finds all its libraries (a package missing from the list above fails the build here).
RUN for b in attnserve attnctl attnbench; do \
      if ldd "/usr/local/bin/$b" | grep 'not found'; then echo "$b: missing libraries" >&2; exit 1; fi; \
    done \
 && attnserve --version

# The configuration: /etc/attnserve/config.pbtxt, which is the embedded default (deploy/config/default.pbtxt,
# the file the server embeds) until a file is mounted over it (`docker run -v`, a Kubernetes ConfigMap).
# Flags given to `docker run IMAGE ...` and ATTNSERVE_* variables override it (see `attnserve --help`).
COPY deploy/config/default.pbtxt /etc/attnserve/config.pbtxt
ENV ATTNSERVE_CONFIG=/etc/attnserve/config.pbtxt
# The server is PID 1 and gets SIGTERM itself: it drains and exits 0 within --shutdown-grace (default 30s;
# `docker stop -t 40` gives it that long).
ENTRYPOINT ["/usr/local/bin/attnserve"]

USER 10001:10001
EXPOSE 50051 9464
STOPSIGNAL SIGTERM
# grpc.health.v1 through attnctl, on the port of ATTNSERVE_GRPC_ADDRESS (default 50051). A port set only in a
# mounted config file needs ATTNSERVE_GRPC_ADDRESS as well for this check to follow it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD a="${ATTNSERVE_HEALTH_ADDRESS:-${ATTNSERVE_GRPC_ADDRESS:-0.0.0.0:50051}}"; exec attnctl --target "127.0.0.1:${a##*:}" health

# Set by deploy/test-container.sh from CMakeLists.txt's project(VERSION); the binaries report it too.
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="attnserve" \
      org.opencontainers.image.description="gRPC inference server for multi-head attention (oneDNN), with dynamic batching and Prometheus metrics" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="NOASSERTION" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"
