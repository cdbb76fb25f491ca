// A source of the current time, injected so that time-based policies (batching delays) can be tested with a
// fake clock instead of sleeps.
//
// Thread-safety: implementations must allow Now() from many threads at once.
#pragma once

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace attnserve {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
};

namespace internal {
class RealClockImpl final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
};
}  // namespace internal

// The process-wide wall clock (absl::Now()). Never null, never destroyed (usable from static destructors
// and detached threads), not owned by the caller. Inline so that server/ needs no extra translation unit.
inline const Clock* RealClock() {
  static const Clock* const clock = new internal::RealClockImpl();
  return clock;
}

}  // namespace attnserve
