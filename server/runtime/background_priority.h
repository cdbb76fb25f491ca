// Runs slow control work (building and warming up a new layer version) on one long-lived thread at the lowest
// CPU priority (nice 19), so that on a machine whose cores the workers keep busy it takes only what they
// leave: a reload then costs the requests being served little, and takes longer itself. The OpenMP team the
// work starts inherits the priority. The thread, its malloc arena and its OpenMP team are kept between loads:
// a new thread per load grew a fresh heap (an mprotect per step, under the lock every page fault of the
// process takes) and a new team each time (BENCHMARKS.md, issue #10). The caller waits for the result; an
// exception thrown by `work` becomes its status (RESOURCE_EXHAUSTED for bad_alloc, INTERNAL otherwise).
//
// Thread-safety: any thread may call it; calls run one at a time, each caller waiting its turn (one slow
// build holds up the loads behind it). Work that calls it again runs the inner work inline.
#pragma once

#include <functional>

#include "absl/status/status.h"

namespace attnserve {

absl::Status RunAtBackgroundPriority(const std::function<absl::Status()>& work);

// The same, but only if no other work runs or waits: false (and `work` not run) when the thread is busy.
bool TryRunAtBackgroundPriority(const std::function<absl::Status()>& work);

}  // namespace attnserve
