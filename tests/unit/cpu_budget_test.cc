// Thread sizing sees container CPU limits.
#include "server/startup/cpu_budget.h"

#include <thread>

#include "gtest/gtest.h"

namespace attnserve {
namespace {

TEST(CpuBudgetTest, CgroupV2) {
  EXPECT_EQ(CpusFromCgroupV2("max 100000"), 0);
  EXPECT_EQ(CpusFromCgroupV2("200000 100000"), 2);
  EXPECT_EQ(CpusFromCgroupV2("150000 100000"), 2);  // 1.5 CPUs: round up
  EXPECT_EQ(CpusFromCgroupV2("50000 100000"), 1);
  EXPECT_EQ(CpusFromCgroupV2(""), 0);
  EXPECT_EQ(CpusFromCgroupV2("garbage 1"), 0);
}

TEST(CpuBudgetTest, CgroupV1) {
  EXPECT_EQ(CpusFromCgroupV1("-1", "100000"), 0);
  EXPECT_EQ(CpusFromCgroupV1("400000", "100000"), 4);
  EXPECT_EQ(CpusFromCgroupV1("", ""), 0);
}

TEST(CpuBudgetTest, AvailableCpusIsWithinTheMachine) {
  const int cpus = AvailableCpus();
  EXPECT_GE(cpus, 1);
  EXPECT_LE(cpus, static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
}

TEST(CpuBudgetTest, WorkerThreadsOnePerCpuUnlessConfigured) {
  EXPECT_EQ(WorkerThreadsFor(3, 2, 16), 3);   // configured: as given, whatever the CPUs
  EXPECT_EQ(WorkerThreadsFor(0, 2, 16), 2);   // 0: one per CPU
  EXPECT_EQ(WorkerThreadsFor(0, 1, 16), 1);
  EXPECT_EQ(WorkerThreadsFor(0, 64, 16), 16);  // capped on large machines
  EXPECT_EQ(WorkerThreadsFor(0, 0, 16), 1);    // at least one
}

}  // namespace
}  // namespace attnserve
