// CpuShares: the CPUs divided among the batches computing at once.
#include "server/runtime/cpu_shares.h"

#include <algorithm>
#include <iterator>
#include <list>
#include <optional>
#include <random>
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

TEST(CpuSharesTest, ABatchAloneTakesEveryCpuAndOthersTheirPartOfTheRest) {
  auto shares = CpuShares::Create({8});
  ASSERT_TRUE(shares.ok());
  CpuShares& s = **shares;
  std::optional<CpuShares::Share> alone(s.Take());
  EXPECT_EQ(alone->threads(), 8);
  // Started while the first holds every CPU: 1 thread each, the only excess over the CPUs.
  std::vector<CpuShares::Share> held;
  for (int i = 0; i < 3; ++i) held.push_back(s.Take());
  for (const auto& share : held) EXPECT_EQ(share.threads(), 1);
  EXPECT_EQ(s.held().threads, 11);
  alone.reset();  // 3 running hold 3 threads: the next gets min(8 / 4, 8 - 3) = 2
  EXPECT_EQ(s.held().threads, 3);
  held.push_back(s.Take());
  EXPECT_EQ(held.back().threads(), 2);
  held.clear();
  EXPECT_EQ(s.held().running, 0);
  EXPECT_EQ(s.held().threads, 0);
  // Two batches starting together on 6 CPUs: 6, then 1; after the first ends, min(6 / 2, 6 - 1) = 3 rounds to 2.
  auto six = CpuShares::Create({6});
  ASSERT_TRUE(six.ok());
  std::optional<CpuShares::Share> first((*six)->Take());
  const CpuShares::Share second = (*six)->Take();
  EXPECT_EQ(first->threads(), 6);
  EXPECT_EQ(second.threads(), 1);
  first.reset();
  EXPECT_EQ((*six)->Take().threads(), 2);
}

TEST(CpuSharesTest, TeamSizesAreEveryShareThereCanBe) {
  EXPECT_EQ(CpuShares::TeamSizes(8, 1), std::vector<int>({8}));
  EXPECT_EQ(CpuShares::TeamSizes(8, 3), std::vector<int>({8, 4, 2, 1}));
  EXPECT_EQ(CpuShares::TeamSizes(6, 2), std::vector<int>({6, 4, 2, 1}));
  EXPECT_EQ(CpuShares::TeamSizes(2, 2), std::vector<int>({2, 1}));
  EXPECT_EQ(CpuShares::TeamSizes(1, 4), std::vector<int>({1}));
  // Every share taken in a random order of takes and releases is one of them.
  auto shares = CpuShares::Create({6});
  ASSERT_TRUE(shares.ok());
  const std::vector<int> sizes = CpuShares::TeamSizes(6, 4);
  std::list<CpuShares::Share> held;  // erased in place: a Share moves but is not assigned
  std::mt19937 rng(3);
  for (int i = 0; i < 1000; ++i) {
    if (held.size() < 4 && (held.empty() || rng() % 2 == 0)) {
      held.push_back((*shares)->Take());
      EXPECT_NE(std::find(sizes.begin(), sizes.end(), held.back().threads()), sizes.end()) << held.back().threads();
    } else {
      held.erase(std::next(held.begin(), static_cast<long>(rng() % held.size())));
    }
  }
}

TEST(CpuSharesTest, TheLargestTeamOfAThreadIsKeptUntilTaken) {
  auto shares = CpuShares::Create({4});
  ASSERT_TRUE(shares.ok());
  CpuShares::TakeLargestTeamOnThisThread();
  {
    const CpuShares::Share a = (*shares)->Take();  // 4
    const CpuShares::Share b = (*shares)->Take();  // 1
  }
  { const CpuShares::Share c = (*shares)->Take(); }  // 4 again
  EXPECT_EQ(CpuShares::TakeLargestTeamOnThisThread(), 4);
  EXPECT_EQ(CpuShares::TakeLargestTeamOnThisThread(), 0);
  int on_other_thread = -1;
  std::thread([&] {
    const CpuShares::Share a = (*shares)->Take();
    const CpuShares::Share b = (*shares)->Take();
    on_other_thread = CpuShares::TakeLargestTeamOnThisThread();
  }).join();
  EXPECT_EQ(on_other_thread, 4);
  EXPECT_EQ(CpuShares::TakeLargestTeamOnThisThread(), 0) << "another thread's shares are not this thread's";
}

TEST(CpuSharesTest, AMovedShareIsReleasedOnce) {
  auto shares = CpuShares::Create({2});
  ASSERT_TRUE(shares.ok());
  {
    CpuShares::Share first = (*shares)->Take();
    CpuShares::Share moved = std::move(first);
    EXPECT_EQ(moved.threads(), 2);
    EXPECT_EQ((*shares)->held().running, 1);
  }
  EXPECT_EQ((*shares)->held().running, 0);
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
  EXPECT_EQ((*shares)->held().running, 0);
  EXPECT_EQ((*shares)->held().threads, 0);
}

}  // namespace
}  // namespace attnserve
