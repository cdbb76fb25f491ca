// A manually driven Clock for tests: time stands still until Advance() or Set(), and threads waiting in
// WaitUntil wake when the time they wait for is reached, so code that sleeps through the clock runs in
// virtual time (no real sleeps, no timing flakes).
//
// Thread-safety: every method may be called from any thread at once.
#pragma once

#include <list>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/batching/clock.h"

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

  void WaitUntil(absl::Mutex* mu, absl::CondVar* cv, absl::Time deadline) const override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    std::list<Waiter>::iterator self;
    {
      absl::MutexLock lock(&mu_);
      if (now_ >= deadline) return;
      self = waiters_.insert(waiters_.end(), Waiter{mu, cv, deadline});
    }
    // Advance signals under `mu`, so a time change between the registration above and this wait (which
    // releases `mu` atomically) is not lost.
    cv->Wait(mu);
    absl::MutexLock lock(&mu_);
    waiters_.erase(self);
  }

  // `d` may be negative (time going backwards, as a wall clock can).
  void Advance(absl::Duration d) { Set(Now() + d); }

  void Set(absl::Time t) {
    std::vector<Waiter> due;
    {
      absl::MutexLock lock(&mu_);
      now_ = t;
      for (const Waiter& w : waiters_) {
        if (w.deadline <= now_) due.push_back(w);
      }
    }
    // Outside mu_: waiters take mu_ while holding their own mutex.
    for (const Waiter& w : due) {
      absl::MutexLock lock(w.mu);
      w.cv->SignalAll();
    }
  }

  // Blocks until at least `n` threads wait in WaitUntil (e.g. every worker of a scheduler is idle), so a
  // test advances time only once the code under test sleeps. False after `timeout` (real time), which
  // only turns a hang into a failure.
  bool AwaitWaiters(size_t n, absl::Duration timeout = absl::Seconds(60)) const {
    absl::MutexLock lock(&mu_);
    auto enough = [this, n]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return waiters_.size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&enough), timeout);
  }

 private:
  struct Waiter {
    absl::Mutex* mu;
    absl::CondVar* cv;
    absl::Time deadline;
  };
  mutable absl::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_);
  mutable std::list<Waiter> waiters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace attnserve::testing
