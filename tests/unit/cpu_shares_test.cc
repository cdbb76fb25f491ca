// CpuShares: the CPUs divided among the batches computing at once.
#include "server/runtime/cpu_shares.h"

#include <thread>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace attnserve {
namespace {

TEST(CpuSharesTest, CreateValidates) {
  auto bad = CpuShares::Create({0});
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().message(), "cpus must be >= 1, got 0");
}

TEST(CpuSharesTest, ABatchAloneTakesEveryCpuAndBatchesAtOnceDivideThem) {
  auto shares = CpuShares::Create({8});
  ASSERT_TRUE(shares.ok());
  CpuShares& s = **shares;
  std::vector<CpuShares::Share> held;
  const int expected[] = {8, 4, 2, 2, 1, 1, 1, 1, 1, 1};  // 8 / running, at least 1
  for (int want : expected) {
    held.push_back(s.Take());
    EXPECT_EQ(held.back().threads(), want) << "batch " << held.size();
  }
  EXPECT_EQ(s.running(), 10);
  held.clear();
  EXPECT_EQ(s.running(), 0);
  EXPECT_EQ(s.Take().threads(), 8);  // a temporary: released at once
  EXPECT_EQ(s.running(), 0);
}

TEST(CpuSharesTest, AMovedShareIsReleasedOnce) {
  auto shares = CpuShares::Create({2});
  ASSERT_TRUE(shares.ok());
  {
    CpuShares::Share first = (*shares)->Take();
    CpuShares::Share moved = std::move(first);
    EXPECT_EQ(moved.threads(), 2);
    EXPECT_EQ((*shares)->running(), 1);
  }
  EXPECT_EQ((*shares)->running(), 0);
}

TEST(CpuSharesTest, ThreadsTakingAndReleasingAtOnceLeaveNothingHeld) {
  auto shares = CpuShares::Create({2});
  ASSERT_TRUE(shares.ok());
  std::vector<std::thread> workers;
  for (int w = 0; w < 4; ++w) {
    workers.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) {
        CpuShares::Share share = (*shares)->Take();
        ASSERT_GE(share.threads(), 1);
        ASSERT_LE(share.threads(), 2);
      }
    });
  }
  for (auto& w : workers) w.join();
  EXPECT_EQ((*shares)->running(), 0);
}

}  // namespace
}  // namespace attnserve
