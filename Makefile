# The README's commands. Every target installs what it needs first (Debian packages only).
BUILD ?= build
ASAN_BUILD ?= build-asan
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?= -G Ninja -DCMAKE_BUILD_TYPE=Release

.PHONY: deps build test test-asan run bench clean

deps:
	bash scripts/install-deps.sh

build: deps
	cmake -S . -B $(BUILD) $(CMAKE_FLAGS)
	cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && ctest --output-on-failure -j 1

test-asan: deps
	cmake -S . -B $(ASAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DATTNSERVE_SANITIZE=address,undefined
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure -j 1 -LE perf

run: build
	./$(BUILD)/server/attnserve $(ARGS)

bench: build
	bash scripts/install-deps.sh --bench
	./$(BUILD)/bench/attnserve_core_bench --benchmark_counters_tabular=true
	/usr/bin/python3 bench/torch_mha.py

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
