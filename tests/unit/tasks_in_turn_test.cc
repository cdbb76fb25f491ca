// RunTasksInTurn (core/tasks_in_turn.h): every task runs once, single-threaded, on a team of the size asked; each
// keeps its own status (one task's error or stop is not another's); a task that throws answers ResourceExhausted
// with the caller's message and the others still run; a team of one runs on the calling thread, also inside a
// parallel region.
#include "core/tasks_in_turn.h"

#include <omp.h>

#include <atomic>
#include <new>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

TEST(TasksInTurnTest, EachTaskOnceSingleThreadedWithItsOwnStatus) {
  omp_set_dynamic(0);
  omp_set_num_threads(2);  // so that a task not made single-threaded would see 2
  constexpr int64_t kTasks = 37;
  std::vector<std::atomic<int>> runs(kTasks);
  std::atomic<int> team_seen{0}, nested_threads{0};
  absl::Mutex mu;
  std::set<std::thread::id> threads;
  const std::vector<absl::Status> status = RunTasksInTurn(
      2, kTasks,
      [&](int64_t i) -> absl::Status {
        runs[i].fetch_add(1);
        team_seen.store(omp_get_num_threads());
        nested_threads.fetch_add(omp_get_max_threads() == 1 ? 0 : 1);  // primitives inside see one thread
        {
          absl::MutexLock lock(&mu);
          threads.insert(std::this_thread::get_id());
        }
        if (i % 5 == 3) return absl::CancelledError(absl::StrCat("task ", i));
        return absl::OkStatus();
      },
      "out of memory");
  ASSERT_EQ(status.size(), static_cast<size_t>(kTasks));
  for (int64_t i = 0; i < kTasks; ++i) {
    EXPECT_EQ(runs[i].load(), 1) << i;
    if (i % 5 == 3) {
      EXPECT_TRUE(absl::IsCancelled(status[i])) << i;
      EXPECT_EQ(status[i].message(), absl::StrCat("task ", i));
    } else {
      EXPECT_TRUE(status[i].ok()) << i << ": " << status[i];
    }
  }
  EXPECT_EQ(team_seen.load(), 2);
  EXPECT_EQ(nested_threads.load(), 0);
  EXPECT_LE(threads.size(), 2u);
}

TEST(TasksInTurnTest, AThrowingTaskIsResourceExhaustedAndTheOthersRun) {
  std::vector<std::atomic<int>> runs(9);
  const std::vector<absl::Status> status = RunTasksInTurn(
      2, 9,
      [&](int64_t i) -> absl::Status {
        runs[i].fetch_add(1);
        if (i == 4) throw std::bad_alloc();
        if (i == 6) throw std::runtime_error("any exception");
        return absl::OkStatus();
      },
      "attention: out of memory in a chunk of rows");
  for (int64_t i = 0; i < 9; ++i) {
    EXPECT_EQ(runs[i].load(), 1) << i;
    if (i == 4 || i == 6) {
      EXPECT_TRUE(absl::IsResourceExhausted(status[i])) << i;
      EXPECT_EQ(status[i].message(), "attention: out of memory in a chunk of rows");
    } else {
      EXPECT_TRUE(status[i].ok()) << i;
    }
  }
}

TEST(TasksInTurnTest, ATeamOfOneRunsOnTheCallingThreadInOrder) {
  const std::thread::id caller = std::this_thread::get_id();
  std::vector<int64_t> order;
  const std::vector<absl::Status> status = RunTasksInTurn(
      1, 5,
      [&](int64_t i) {
        EXPECT_EQ(std::this_thread::get_id(), caller);
        order.push_back(i);
        return absl::OkStatus();
      },
      "out of memory");
  EXPECT_EQ(order, (std::vector<int64_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(status.size(), 5u);
  // Inside a parallel region (a thread of a group's team): no new team, each thread its own tasks in order.
  omp_set_dynamic(0);
  std::vector<std::vector<int64_t>> per_thread(2);
  std::vector<int> team_in_task(2, 0);
  int outer_team = 0;
#pragma omp parallel num_threads(2)
  {
    const int t = omp_get_thread_num();
#pragma omp single
    outer_team = omp_get_num_threads();
    RunTasksInTurn(
        1, 3,
        [&](int64_t i) {
          per_thread[t].push_back(i);
          team_in_task[t] = omp_get_num_threads();
          return absl::OkStatus();
        },
        "oom");
  }
  ASSERT_EQ(outer_team, 2);
  for (int t = 0; t < 2; ++t) {
    EXPECT_EQ(per_thread[t], (std::vector<int64_t>{0, 1, 2})) << t;
    EXPECT_EQ(team_in_task[t], 1) << t;
  }
}

}  // namespace
}  // namespace attnserve
