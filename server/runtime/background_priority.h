// Runs slow control work (building and warming up a new layer version) on a thread of its own at the lowest
// CPU priority (nice 19), so that on a machine whose cores the workers keep busy it takes only what they
// leave: a reload then costs the requests being served almost nothing, and takes longer itself. The
// OpenMP team the work starts inherits the priority. The caller waits for the result; an exception thrown by
// `work` becomes its status (RESOURCE_EXHAUSTED for bad_alloc, INTERNAL otherwise).
//
// Thread-safety: any thread may call it; calls are independent.
#pragma once

#include <functional>

#include "absl/status/status.h"

namespace attnserve {

absl::Status RunAtBackgroundPriority(const std::function<absl::Status()>& work);

}  // namespace attnserve
