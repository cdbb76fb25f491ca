# The README's commands. Every target installs what it needs first (Debian packages only).
BUILD ?= build
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan
FUZZ_BUILD ?= build-fuzz
# make fuzz: seconds each libFuzzer harness runs (tests/fuzz).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= infer_request_fuzz kserve_request_fuzz safetensors_fuzz config_fuzz
# The tests with threads of their own, run under ThreadSanitizer: the KV cache pool, the scheduler and queue,
# the layer registry, the executor and metrics, the engine on many threads, the in-process server (service,
# drain, reload), the Open Inference Protocol's service and layer catalog (streams, control thread), the
# reset-flood guard's thread beside a caller, and the session opener's thread (its worker, the drain).
TSAN_TESTS ?= kv_cache_pool_test background_priority_test load_heap_pad_test batch_queue_test batch_scheduler_test layer_registry_test batch_executor_test metrics_test \
              call_counts_test reset_flood_guard_test \
              mha_threads_test layer_reload_test attention_service_test credential_store_test listener_probe_test \
              kserve_service_test layer_catalog_test cpu_shares_test serial_worker_test session_service_test
# Under TSan the two service tests that push hundreds of large messages through gRPC took minutes (overload:
# 8 s in one run, 214 s in another); the rest of the service tests, the stream among them, run.
TSAN_GTEST_FILTER ?= -AttentionServiceTest.OverloadGetsResourceExhausted:AttentionServiceTest.MalformedRequestsAmongGoodOnes
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?= -G Ninja -DCMAKE_BUILD_TYPE=Release

.PHONY: deps build test test-asan test-tsan fuzz run bench bench-serving clean

deps:
	bash scripts/install-deps.sh

build: deps
	cmake -S . -B $(BUILD) $(CMAKE_FLAGS)
	cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && ctest --output-on-failure -j 1

# The sanitizer builds compile at -O1 with line tables only (-g1): half the compile time of -O2 -g, and the
# reports keep their file:line frames. core/ stays at -O2 (its kernels are what the tests spend time in).
# Tests labelled deploy run no compiled code of ours (manifests, rules, dashboards): `make test` runs them once.
SANITIZER_OPT_FLAGS = -DCMAKE_CXX_FLAGS_RELWITHDEBINFO='-O1 -g1 -DNDEBUG'

# listener_recovery_test runs in `make test` only: exhausting the process's descriptors also starves the
# sanitizer runtime, and UBSan's vptr check then flags a shared_ptr that gRPC's uninstrumented library made.
# So do the *_AVX512_BF16 variants (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16): on CI's machine kind, AVX512_BF16 without
# AMX, they run the same kernels as the tests they repeat (72 s under ASan); on an AMX machine `make test` runs them.
test-asan: deps
	cmake -S . -B $(ASAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo $(SANITIZER_OPT_FLAGS) \
	  -DATTNSERVE_SANITIZE=address,undefined
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1 LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp \
	  ctest --output-on-failure -j 1 -LE '^(perf|deploy)$$' -E '^(listener_recovery_test|.*_AVX512_BF16)$$'

# Only the threaded tests' targets are built: the rest has no threads of its own to race. abseil's
# synchronization is compiled in from Debian's source (see CMakeLists.txt); the suppressions file lists only
# uninstrumented libraries' frames, one comment each. ignore_noninstrumented_modules: interceptors called from
# those libraries (gRPC's sendmsg of a reply another thread encoded) check no memory; each 8 bytes of such a
# reply was a suppressed race, found again in a list that grows with each, and attention_service_test's 400
# replies then took 11 minutes (4 s with it; our code's own calls are still checked).
test-tsan: deps
	bash scripts/install-deps.sh --tsan
	cmake -S . -B $(TSAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo $(SANITIZER_OPT_FLAGS) -DATTNSERVE_SANITIZE=thread \
	  -DATTNSERVE_ABSEIL_SOURCE_DIR=$(CURDIR)/build-deps/abseil-src
	cmake --build $(TSAN_BUILD) -j $(JOBS) --target $(TSAN_TESTS)
	cd $(TSAN_BUILD) && TSAN_OPTIONS="suppressions=$(CURDIR)/tests/tsan.supp halt_on_error=1 second_deadlock_stack=1 ignore_noninstrumented_modules=1" \
	  GTEST_FILTER='$(TSAN_GTEST_FILTER)' ctest --output-on-failure -j 1 -R '^($(shell echo $(TSAN_TESTS) | tr ' ' '|'))$$'

# libFuzzer (clang-14, ASan + UBSan) on the request, safetensors and config decoders, FUZZ_SECONDS each, on a
# copy of tests/fuzz/corpus in $(FUZZ_BUILD); fails on any crash, printing the input's path (see
# tests/fuzz/regressions/README.md). The normal builds replay the corpus as ctests (label fuzz).
fuzz:
	bash scripts/install-deps.sh --fuzz
	CC=clang-14 CXX=clang++-14 cmake -S . -B $(FUZZ_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DATTNSERVE_FUZZ=ON
	cmake --build $(FUZZ_BUILD) -j $(JOBS) --target $(FUZZ_TARGETS)
	bash tests/fuzz/run_fuzzers.sh $(FUZZ_BUILD) $(FUZZ_SECONDS) $(FUZZ_TARGETS)

run: build
	./$(BUILD)/server/attnserve $(ARGS)

bench: build
	bash scripts/install-deps.sh --bench
	/usr/bin/python3 bench/compare_core.py --bench $(BUILD)/bench/attnserve_core_bench

bench-serving: build
	/usr/bin/python3 bench/serving_bench.py --build $(BUILD)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD) $(FUZZ_BUILD)

# The container test: builds the Dockerfile's image with buildah (no Docker engine needed) and runs it
# (deploy/test-container.sh). Needs root; installs buildah and debootstrap first.
.PHONY: test-container
test-container: build
	bash scripts/install-deps.sh --container
	nice -n 10 bash deploy/test-container.sh
