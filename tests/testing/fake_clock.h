// A manually driven Clock for tests: time stands still until Advance() or Set().
//
// Thread-safety: every method may be called from any thread at once. Note that nothing is notified when the
// time moves: code waiting on a real deadline derived from this clock only sees the change when it next
// calls Now().
#pragma once

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/clock.h"

namespace attnserve::testing {

class FakeClock final : public Clock {
 public:
  // Starts at an arbitrary fixed instant (not the Unix epoch, so that "time zero" bugs show up).
  FakeClock() : FakeClock(absl::FromUnixSeconds(1'700'000'000)) {}
  explicit FakeClock(absl::Time start) : now_(start) {}

  absl::Time Now() const override {
    absl::MutexLock lock(&mu_);
    return now_;
  }
  // `d` may be negative (time going backwards, as a wall clock can).
  void Advance(absl::Duration d) {
    absl::MutexLock lock(&mu_);
    now_ += d;
  }
  void Set(absl::Time t) {
    absl::MutexLock lock(&mu_);
    now_ = t;
  }

 private:
  mutable absl::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_);
};

}  // namespace attnserve::testing
