// One thread that runs tasks in the order they were posted: slow work (loading a layer's weights, projecting
// a session's memories) off the RPC library's threads, whose handlers must not block. At most `max_pending` tasks wait;
// Post refuses more. The destructor lets the running task finish, calls each task still waiting with run = false (so
// that it can answer "shutting down" instead of working), then joins; Stop does the same earlier.
//
// Thread-safety: Post and stopping may be called from any thread, Stop from any but the worker's own (a task
// must not call it).
#pragma once

#include <deque>
#include <functional>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/thread_name.h"

namespace attnserve {

class SerialWorker {
 public:
  // `thread_name` (at most 15 bytes) names the thread for top -H and perf.
  SerialWorker(size_t max_pending, std::string thread_name)
      : max_pending_(max_pending), thread_name_(std::move(thread_name)), thread_([this] { Run(); }) {}
  ~SerialWorker() { Stop(); }
  SerialWorker(const SerialWorker&) = delete;
  SerialWorker& operator=(const SerialWorker&) = delete;

  // False (and `task` dropped) when max_pending tasks wait already or the worker is stopping.
  bool Post(std::function<void(bool run)> task) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    if (stopping_ || tasks_.size() >= max_pending_) return false;
    tasks_.push_back(std::move(task));
    return true;
  }

  // What the destructor does, at once: the running task finishes, the waiting ones are called with
  // run = false, Post refuses from now on. Returns when the thread has ended. Idempotent; not concurrently
  // with the destructor.
  void Stop() ABSL_LOCKS_EXCLUDED(mu_) {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    absl::MutexLock join_lock(&join_mu_);  // two callers of Stop at once: one joins, the other waits for it
    if (thread_.joinable()) thread_.join();
  }

  // Whether Stop has begun: a refused Post was refused for that rather than for max_pending.
  bool stopping() const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return stopping_;
  }

  // Whether a Post now would be refused (max_pending tasks wait, or stopping): for a caller that would prepare
  // its task at a cost first. A task taken meanwhile may make room again; Post decides.
  bool full() const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return stopping_ || tasks_.size() >= max_pending_;
  }

 private:
  bool HasWorkOrStopping() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_ || !tasks_.empty(); }

  void Run() {
    NameThisThread(thread_name_);
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
  const std::string thread_name_;
  mutable absl::Mutex mu_;
  absl::Mutex join_mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<std::function<void(bool)>> tasks_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;  // last: starts once the rest is built
};

}  // namespace attnserve
