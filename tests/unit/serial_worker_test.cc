// SerialWorker: tasks run one at a time in the order posted; past max_pending waiting, Post refuses; Stop lets
// the running task finish, calls the waiting ones with run = false and refuses later posts.
#include "server/runtime/serial_worker.h"

#include <atomic>
#include <functional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

// What the tasks saw: (task number, run) in the order they were called.
class Calls {
 public:
  std::function<void(bool)> Task(int n) {
    return [this, n](bool run) {
      absl::MutexLock lock(&mu_);
      seen_.emplace_back(n, run);
    };
  }
  std::vector<std::pair<int, bool>> seen() const {
    absl::MutexLock lock(&mu_);
    return seen_;
  }
  void WaitFor(size_t n) const {
    absl::MutexLock lock(&mu_);
    const auto enough = [this, n]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return seen_.size() >= n; };
    mu_.Await(absl::Condition(&enough));
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<std::pair<int, bool>> seen_ ABSL_GUARDED_BY(mu_);
};

// A task that holds the worker until `release` is notified, once it has started (`started`).
std::function<void(bool)> Blocking(absl::Notification* started, absl::Notification* release) {
  return [started, release](bool) {
    started->Notify();
    release->WaitForNotification();
  };
}

TEST(SerialWorkerTest, TasksRunInOrderAndPostRefusesPastMaxPending) {
  // Declared before the worker, which they must outlive (its destructor runs what is left).
  absl::Notification started, release;
  Calls calls;
  SerialWorker worker(/*max_pending=*/2, "test-serial");
  ASSERT_TRUE(worker.Post(Blocking(&started, &release)));
  started.WaitForNotification();  // running, so no longer waiting
  EXPECT_TRUE(worker.Post(calls.Task(1)));
  EXPECT_FALSE(worker.full());
  EXPECT_TRUE(worker.Post(calls.Task(2)));
  EXPECT_TRUE(worker.full());
  EXPECT_FALSE(worker.Post(calls.Task(3)));  // two wait already
  EXPECT_FALSE(worker.stopping());
  release.Notify();
  calls.WaitFor(2);
  EXPECT_EQ(calls.seen(), (std::vector<std::pair<int, bool>>{{1, true}, {2, true}}));
  EXPECT_FALSE(worker.full());
  EXPECT_TRUE(worker.Post(calls.Task(4)));  // room again
  calls.WaitFor(3);
  EXPECT_EQ(calls.seen().back(), std::make_pair(4, true));
}

TEST(SerialWorkerTest, StopFinishesTheRunningTaskAndAnswersTheWaitingOnesWithoutRunningThem) {
  absl::Notification started, release;
  Calls calls;
  SerialWorker worker(/*max_pending=*/4, "test-serial");
  ASSERT_TRUE(worker.Post(Blocking(&started, &release)));
  started.WaitForNotification();
  ASSERT_TRUE(worker.Post(calls.Task(1)));
  ASSERT_TRUE(worker.Post(calls.Task(2)));
  std::atomic<bool> stopped{false};
  std::thread stopper([&] {
    worker.Stop();  // returns once the running task has finished and the waiting ones were called
    stopped.store(true);
  });
  while (!worker.stopping()) absl::SleepFor(absl::Milliseconds(1));
  EXPECT_TRUE(worker.full());                // stopping, though only two wait
  EXPECT_FALSE(worker.Post(calls.Task(3)));  // refused
  EXPECT_FALSE(stopped.load());              // the running task holds Stop
  release.Notify();
  stopper.join();
  EXPECT_EQ(calls.seen(), (std::vector<std::pair<int, bool>>{{1, false}, {2, false}}));
  worker.Stop();  // again: nothing left to do
  EXPECT_FALSE(worker.Post(calls.Task(4)));
  EXPECT_EQ(calls.seen().size(), 2u);
}

}  // namespace
}  // namespace attnserve
