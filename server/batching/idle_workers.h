// The workers asleep, woken the one that went to sleep last first: it ran the latest batch, so its core's
// caches (and its OpenMP team) are the warmest. With one condition variable for all, a lone client's requests
// would go to whichever worker slept longest, alternating cores.
//
// Not thread-safe: the owner's mutex guards it (BatchScheduler's mu_). A worker registers with Sleeping()
// before it waits on the returned condition variable, and calls Awake() after any return from the wait
// (signalled, deadline, or a fake clock's advance).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace attnserve {

class IdleWorkers {
 public:
  // Workers are numbered 0 .. workers - 1.
  explicit IdleWorkers(int workers) : cvs_(static_cast<size_t>(std::max(workers, 0))) {}

  // `worker` is about to wait: the condition variable it waits on.
  absl::CondVar* Sleeping(int worker) {
    asleep_.push_back(worker);
    return &cvs_[worker];
  }
  // `worker` returned from its wait; no-op if a Wake already took it off the list.
  void Awake(int worker) {
    const auto it = std::find(asleep_.begin(), asleep_.end(), worker);
    if (it != asleep_.end()) asleep_.erase(it);
  }
  // Wakes the worker asleep the shortest time, taking it off the list at once, so that a second WakeOne
  // wakes another worker. No-op if none is asleep (a busy or polling worker rescans the queues anyway).
  void WakeOne() {
    if (asleep_.empty()) return;
    cvs_[asleep_.back()].Signal();
    asleep_.pop_back();
    ++woken_;
  }
  void WakeAll() {
    for (int worker : asleep_) cvs_[worker].Signal();
    woken_ += static_cast<int64_t>(asleep_.size());
    asleep_.clear();
  }
  size_t asleep() const { return asleep_.size(); }
  // Workers taken off the list by WakeOne and WakeAll so far.
  int64_t woken() const { return woken_; }

 private:
  std::vector<absl::CondVar> cvs_;  // one per worker, never resized
  std::vector<int> asleep_;         // in the order they went to sleep
  int64_t woken_ = 0;
};

}  // namespace attnserve
