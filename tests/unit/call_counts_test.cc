// CallCounts: attnserve_grpc_calls_total's bounded method labels and its counts.
#include "server/api/call_counts.h"

#include <prometheus/registry.h>

#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/metric_values.h"

namespace attnserve {
namespace {

using testing::FindMetric;

double Calls(const prometheus::Registry& registry, const std::string& method, const std::string& code) {
  const auto value = FindMetric(registry, "attnserve_grpc_calls_total", {{"method", method}, {"code", code}});
  return value ? value->value : 0;
}

TEST(CallCountsTest, KnownMethodsByPathOthersShareOneLabel) {
  prometheus::Registry registry;
  CallCounts counts(registry, {"/a.S/One", "/a.S/Two", "/a.S/One"});
  const int one = counts.MethodIndex("/a.S/One"), two = counts.MethodIndex("/a.S/Two");
  EXPECT_NE(one, two);
  const int other = counts.MethodIndex("/a.S/Three");
  EXPECT_EQ(counts.MethodIndex(nullptr), other);
  EXPECT_EQ(counts.MethodIndex("a.S/One"), other);  // gRPC's names start with "/"
  std::mt19937_64 rng(7);
  for (int i = 0; i < 20; ++i) {
    std::string path = "/";
    for (int c = 0; c < 40; ++c) path += static_cast<char>('a' + rng() % 26);
    counts.Count(counts.MethodIndex(path.c_str()), absl::StatusCode::kUnimplemented);
  }
  counts.Count(one, absl::StatusCode::kOk);
  counts.Count(one, absl::StatusCode::kOk);
  counts.Count(two, absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Calls(registry, "a.S/One", "OK"), 2);
  EXPECT_EQ(Calls(registry, "a.S/Two", "INVALID_ARGUMENT"), 1);
  EXPECT_EQ(Calls(registry, "other", "UNIMPLEMENTED"), 20);
  size_t series = 0;
  for (const prometheus::MetricFamily& family : registry.Collect()) series += family.metric.size();
  EXPECT_EQ(series, 3u);  // twenty random paths made one series
}

TEST(CallCountsTest, CodesOutsideAbslCountAsUnknown) {
  prometheus::Registry registry;
  CallCounts counts(registry, {"/a.S/One"});
  counts.Count(0, static_cast<absl::StatusCode>(17));
  counts.Count(0, static_cast<absl::StatusCode>(-1));
  counts.Count(0, absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(Calls(registry, "a.S/One", "UNKNOWN"), 2);
  EXPECT_EQ(Calls(registry, "a.S/One", "UNAUTHENTICATED"), 1);
}

TEST(CallCountsTest, ConcurrentCountsAddUp) {
  prometheus::Registry registry;
  CallCounts counts(registry, {"/a.S/One"});
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&counts, t] {
      for (int i = 0; i < 1000; ++i) counts.Count(0, t % 2 ? absl::StatusCode::kOk : absl::StatusCode::kCancelled);
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(Calls(registry, "a.S/One", "OK"), 2000);
  EXPECT_EQ(Calls(registry, "a.S/One", "CANCELLED"), 2000);
}

}  // namespace
}  // namespace attnserve
