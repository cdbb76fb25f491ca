// Names the calling thread, as `top -H`, `ps -L`, perf and gdb show it ("attn-batch", "attn-memguard"): at
// most 15 characters (the kernel's limit; longer names are cut). Threads a named thread starts, such as its
// OpenMP team, inherit its name.
#pragma once

#include <pthread.h>

#include <string>

namespace attnserve {

inline void NameThisThread(const std::string& name) {
  (void)pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
}

}  // namespace attnserve
