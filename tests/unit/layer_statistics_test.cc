// LayerStatistics: totals per layer version as ModelStatistics reports them, and a bounded number of versions
// per layer however often it is reloaded.
#include "server/observability/layer_statistics.h"

#include "gtest/gtest.h"

namespace attnserve {
namespace {

TEST(LayerStatisticsTest, CountsPerVersion) {
  LayerStatistics stats;
  const absl::Time now = absl::FromUnixSeconds(1000);
  stats.RequestDone("a", 1, true, absl::Microseconds(30), absl::Microseconds(10), absl::Microseconds(15), 4, now);
  stats.RequestDone("a", 1, false, absl::Microseconds(7), absl::Microseconds(99), absl::Microseconds(99), 4, now);
  stats.BatchDone("a", 1, 3, absl::Microseconds(15));
  stats.RequestDone("a", 2, true, absl::Microseconds(50), absl::Microseconds(20), absl::Microseconds(25), 2, now);
  stats.RequestDone("b", 1, true, absl::Microseconds(1), absl::Microseconds(1), absl::Microseconds(1), 1, now);
  const std::vector<VersionStatistics> a1 = stats.Snapshot("a", 1);
  ASSERT_EQ(a1.size(), 1u);
  EXPECT_EQ(a1[0].inference_count, 4u);  // sequences of the OK request only
  EXPECT_EQ(a1[0].success.count, 1u);
  EXPECT_EQ(a1[0].success.ns, 30000u);
  EXPECT_EQ(a1[0].fail.count, 1u);
  EXPECT_EQ(a1[0].fail.ns, 7000u);
  EXPECT_EQ(a1[0].queue.ns, 10000u);  // the failed request's queue and compute are not counted
  EXPECT_EQ(a1[0].compute.ns, 15000u);
  EXPECT_EQ(a1[0].execution_count, 1u);
  EXPECT_EQ(a1[0].batches.at(3).count, 1u);
  EXPECT_EQ(a1[0].last_inference, now);
  const std::vector<VersionStatistics> a = stats.Snapshot("a", 0);
  ASSERT_EQ(a.size(), 2u);
  EXPECT_EQ(a[1].version, 2);
  EXPECT_EQ(a[1].inference_count, 2u);
  EXPECT_EQ(stats.Snapshot("", 0).size(), 3u);
  EXPECT_TRUE(stats.Snapshot("c", 0).empty());
}

TEST(LayerStatisticsTest, KeepsTheNewestVersionsOfEachLayer) {
  LayerStatistics stats;
  const int64_t last = LayerStatistics::kVersionsKept + 20;
  for (int64_t v = 1; v <= last; ++v) {
    stats.RequestDone("a", v, true, absl::Microseconds(1), absl::Microseconds(1), absl::Microseconds(1), 1,
                      absl::Now());
    stats.BatchDone("a", v, 1, absl::Microseconds(1));
  }
  stats.RequestDone("b", 1, true, absl::Microseconds(1), absl::Microseconds(1), absl::Microseconds(1), 1, absl::Now());
  const std::vector<VersionStatistics> a = stats.Snapshot("a", 0);
  ASSERT_EQ(a.size(), static_cast<size_t>(LayerStatistics::kVersionsKept));
  EXPECT_EQ(a.front().version, last - LayerStatistics::kVersionsKept + 1);
  EXPECT_EQ(a.back().version, last);
  for (const VersionStatistics& s : a) EXPECT_EQ(s.success.count, 1u) << s.version;
  EXPECT_EQ(stats.Snapshot("b", 0).size(), 1u);  // another layer's versions are not counted against it
}

}  // namespace
}  // namespace attnserve
