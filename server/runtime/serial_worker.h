// One thread that runs tasks in the order they were posted: slow control work (loading a layer's weights)
// off the RPC library's threads, whose handlers must not block. At most `max_pending` tasks wait; Post refuses
// more. The destructor lets the running task finish, calls each task still waiting with run = false (so that
// it can answer "shutting down" instead of working), then joins.
//
// Thread-safety: Post may be called from any thread.
#pragma once

#include <deque>
#include <functional>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace attnserve {

class SerialWorker {
 public:
  explicit SerialWorker(size_t max_pending) : max_pending_(max_pending), thread_([this] { Run(); }) {}
  ~SerialWorker() {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    thread_.join();
  }
  SerialWorker(const SerialWorker&) = delete;
  SerialWorker& operator=(const SerialWorker&) = delete;

  // False (and `task` dropped) when max_pending tasks wait already or the worker is stopping.
  bool Post(std::function<void(bool run)> task) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    if (stopping_ || tasks_.size() >= max_pending_) return false;
    tasks_.push_back(std::move(task));
    return true;
  }

 private:
  bool HasWorkOrStopping() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_ || !tasks_.empty(); }

  void Run() {
    while (true) {
      std::function<void(bool)> task;
      bool run = false;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(this, &SerialWorker::HasWorkOrStopping));
        if (tasks_.empty()) return;  // stopping, and nothing left
        task = std::move(tasks_.front());
        tasks_.pop_front();
        run = !stopping_;
      }
      task(run);
    }
  }

  const size_t max_pending_;
  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<std::function<void(bool)>> tasks_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;  // last: starts once the rest is built
};

}  // namespace attnserve
