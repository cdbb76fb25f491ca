// A source of the current time that also waits, injected so that time-based policies (batching delays)
// are tested in virtual time: a fake clock (tests/testing/fake_clock.h) moves only when the test advances
// it, and wakes the threads waiting for the time it reaches, as TF Serving's FakeClockEnv fakes both
// NowMicros and SleepForMicroseconds.
//
// Thread-safety: implementations must allow every method from many threads at once.
#pragma once

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace attnserve {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;

  // absl::CondVar::WaitWithDeadline in this clock's time: with `mu` held, releases it and blocks until
  // `cv` is signalled or Now() reaches `deadline` (never, for absl::InfiniteFuture()), then holds `mu`
  // again. May return early (spuriously), so callers re-check their condition in a loop.
  virtual void WaitUntil(absl::Mutex* mu, absl::CondVar* cv, absl::Time deadline) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) = 0;
};

namespace internal {
class RealClockImpl final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
  void WaitUntil(absl::Mutex* mu, absl::CondVar* cv, absl::Time deadline) const override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (deadline == absl::InfiniteFuture()) {
      cv->Wait(mu);
    } else {
      cv->WaitWithDeadline(mu, deadline);
    }
  }
};
}  // namespace internal

// The process-wide wall clock (absl::Now()). Never null, never destroyed (usable from static destructors
// and detached threads), not owned by the caller. Inline so that server/ needs no extra translation unit.
inline const Clock* RealClock() {
  static const Clock* const clock = new internal::RealClockImpl();
  return clock;
}

}  // namespace attnserve
