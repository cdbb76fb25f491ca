// Client-supplied strings (layer names, request ids, anything echoed) made safe for a log line or an error
// message: bounded in size and free of bytes that could forge a line (newlines, terminal escapes).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace attnserve {

// Printable ASCII is kept except the backslash; every other byte becomes \xNN (so a newline cannot start a
// forged log line). At most `max_bytes` of `s` are kept; a longer string ends in "...(N bytes)".
std::string BoundedForLog(absl::string_view s, size_t max_bytes = 128);

// At most `lines_per_second` lines per one-second window; what is dropped is counted and reported with the
// next line allowed ("(N similar lines dropped)"), so a flood of bad requests cannot flood the log.
//
// Thread-safety: Allow may be called from any thread at once.
class LogRateLimiter {
 public:
  explicit LogRateLimiter(int64_t lines_per_second) : lines_per_second_(lines_per_second) {}
  // True when a line may be written at `now`; *dropped is then the number dropped since the last one.
  bool Allow(absl::Time now, int64_t* dropped) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  const int64_t lines_per_second_;
  absl::Mutex mu_;
  absl::Time window_start_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  int64_t in_window_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t dropped_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace attnserve
