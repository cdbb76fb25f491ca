// RunAtBackgroundPriority: work runs on one long-lived thread at nice 19, one item at a time, and a throw
// becomes a status without ending the thread.
#include "server/runtime/background_priority.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <new>
#include <stdexcept>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace attnserve {
namespace {

pid_t ThreadId() { return static_cast<pid_t>(syscall(SYS_gettid)); }
int NiceOf(pid_t tid) { return getpriority(PRIO_PROCESS, static_cast<id_t>(tid)); }

TEST(BackgroundPriorityTest, WorkRunsAtNice19OnOneKeptThread) {
  const int caller_nice = NiceOf(ThreadId());
  pid_t first = 0, second = 0;
  int nice_inside = 0;
  ASSERT_TRUE(RunAtBackgroundPriority([&] {
                first = ThreadId();
                nice_inside = NiceOf(first);
                return absl::OkStatus();
              }).ok());
  ASSERT_TRUE(RunAtBackgroundPriority([&] {
                second = ThreadId();
                return absl::OkStatus();
              }).ok());
  EXPECT_EQ(nice_inside, 19);
  EXPECT_NE(first, ThreadId());
  EXPECT_EQ(first, second);  // the same thread (and so its malloc arena and OpenMP team) each time
  EXPECT_EQ(NiceOf(ThreadId()), caller_nice);
}

TEST(BackgroundPriorityTest, StatusesAndThrowsComeBackAndTheThreadGoesOn) {
  EXPECT_EQ(RunAtBackgroundPriority([] { return absl::InvalidArgumentError("bad"); }).code(),
            absl::StatusCode::kInvalidArgument);
  const absl::Status oom = RunAtBackgroundPriority([]() -> absl::Status { throw std::bad_alloc(); });
  EXPECT_EQ(oom.code(), absl::StatusCode::kResourceExhausted) << oom;
  const absl::Status thrown = RunAtBackgroundPriority([]() -> absl::Status { throw std::runtime_error("boom"); });
  EXPECT_EQ(thrown.code(), absl::StatusCode::kInternal);
  EXPECT_NE(thrown.message().find("boom"), absl::string_view::npos) << thrown;
  EXPECT_TRUE(RunAtBackgroundPriority([] { return absl::OkStatus(); }).ok());
}

// Work that asks for the background thread again is already on it: the inner work runs inline, no deadlock.
TEST(BackgroundPriorityTest, NestedWorkRunsInline) {
  pid_t outer = 0, inner = 0;
  const absl::Status status = RunAtBackgroundPriority([&] {
    outer = ThreadId();
    return RunAtBackgroundPriority([&] {
      inner = ThreadId();
      return absl::AlreadyExistsError("inner");
    });
  });
  EXPECT_EQ(status.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(inner, outer);
}

// Callers on many threads each get their own work's result, and no two items ever run at once.
TEST(BackgroundPriorityTest, ConcurrentCallersTakeTurns) {
  std::atomic<int> running{0};
  std::atomic<bool> overlapped{false};
  std::vector<absl::Status> results(8);
  std::vector<std::thread> callers;
  for (int i = 0; i < 8; ++i) {
    callers.emplace_back([&, i] {
      results[i] = RunAtBackgroundPriority([&, i] {
        if (++running > 1) overlapped = true;
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
        --running;
        return i % 2 == 0 ? absl::OkStatus() : absl::NotFoundError(std::to_string(i));
      });
    });
  }
  for (std::thread& t : callers) t.join();
  EXPECT_FALSE(overlapped.load());
  for (int i = 0; i < 8; ++i) {
    if (i % 2 == 0) {
      EXPECT_TRUE(results[i].ok()) << i;
    } else {
      EXPECT_EQ(results[i].message(), std::to_string(i));
    }
  }
}

}  // namespace
}  // namespace attnserve
