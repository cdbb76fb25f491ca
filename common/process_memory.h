// What this process holds in memory, as the kernel counts it.
#pragma once

#include <cstdint>

namespace attnserve {

// The process's resident set now (/proc/self/statm), in bytes; -1 when unreadable. Thread-safe.
int64_t ResidentSetBytes();

}  // namespace attnserve
