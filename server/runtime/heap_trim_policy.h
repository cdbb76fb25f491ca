// When the server gives malloc's free pages back to the system (malloc_trim). glibc serves a large allocation
// from a free chunk of its heaps before it maps new memory (the mmap threshold applies only when the heap has
// no chunk that fits), and a chunk freed and trimmed is faulted in again when reused. So after a flood has left
// free space in the heaps (a reconnecting rapid reset: hundreds of MiB), any allocator churn touches it anew:
// Debian 12's HTTP/2 transport copies a header value sent in CONTINUATION frames at each frame, into a new
// buffer each time a bit larger, and each landed on pages not yet touched, up to +341 MiB RSS for a 15 MiB
// value per connection, where the same flood on a fresh process grew +37 MiB. Envoy's overload manager shrinks its heap
// past a threshold; this does the same on growth:
//  - growth: the RSS rose `growth_trim_bytes` above its lowest since the last trim: trim now, requests in
//    flight or not. Steady serving does not grow, so it does not trim; a flood's churn is trimmed as it grows.
//  - idle: every `idle_interval` while no request holds memory (what a flood's slices left).
// Neither while layers load (their heap pad keeps pages for the next build on purpose: load_heap_pad.h).
//
// Policy apart from threads and time: Check() is given the time, the RSS and the server's state; the server's
// trimmer thread calls it every few tens of milliseconds and trims when told. Thread-safety: not thread-safe.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace attnserve {

class HeapTrimPolicy {
 public:
  struct Options {
    // RSS growth above its lowest since the last trim that makes a trim due at once. > 0.
    int64_t growth_trim_bytes = int64_t{32} << 20;
    // How often the heap is trimmed while no request holds memory. > 0.
    absl::Duration idle_interval = absl::Seconds(1);
  };
  enum class Trim { kNone, kGrowth, kIdle };

  // InvalidArgument naming the option out of range.
  static absl::StatusOr<std::unique_ptr<HeapTrimPolicy>> Create(const Options& options);

  // What to do now. `rss_bytes` < 0 (unreadable) makes no growth trim; `requests_hold_memory`: a request has
  // a reservation in the memory budget; `layers_loading`: the load heap pad is up.
  Trim Check(absl::Time now, int64_t rss_bytes, bool requests_hold_memory, bool layers_loading);
  // After a trim: the RSS it left (< 0: unknown, the next reading counts as the lowest).
  void Trimmed(absl::Time now, int64_t rss_after_bytes);

 private:
  explicit HeapTrimPolicy(const Options& options) : options_(options) {}

  const Options options_;
  int64_t lowest_rss_bytes_ = -1;  // since the last trim; -1 until a reading
  absl::Time last_trim_ = absl::InfinitePast();
};

// The growth step for a memory budget: an eighth of it, at least 16 MiB.
int64_t HeapGrowthTrimBytes(int64_t memory_budget_bytes);

const char* HeapTrimName(HeapTrimPolicy::Trim trim);  // "growth", "idle" or "none"

}  // namespace attnserve
