// ServerMetrics: series by layer, version and status code, a bounded number of versions per layer, layers added while
// serving, unknown layers folded into one series, and the /metrics endpoint.
#include "server/observability/metrics.h"

#include "gtest/gtest.h"
#include "tests/testing/http_get.h"
#include "tests/testing/metric_values.h"

namespace attnserve {
namespace {

using testing::FindMetric;

TEST(ServerMetricsTest, RequestsByLayerVersionAndCodeName) {
  ServerMetrics metrics({"a"});
  metrics.RequestDone("a", 1, absl::StatusCode::kOk, 0.001);
  metrics.RequestDone("a", 1, absl::StatusCode::kOk, 0.003);
  metrics.RequestDone("a", 1, absl::StatusCode::kResourceExhausted, 0.0001);
  metrics.RequestDone("a", 2, absl::StatusCode::kOk, 0.5);
  metrics.RequestDone("a", 0, absl::StatusCode::kNotFound, 0);  // a version that is not loaded
  const prometheus::Registry& r = *metrics.registry();
  EXPECT_EQ(FindMetric(r, "attnserve_requests_total", {{"layer", "a"}, {"version", "1"}, {"code", "OK"}})->value, 2);
  EXPECT_EQ(
      FindMetric(r, "attnserve_requests_total", {{"layer", "a"}, {"version", "1"}, {"code", "RESOURCE_EXHAUSTED"}})
          ->value,
      1);
  EXPECT_EQ(FindMetric(r, "attnserve_requests_total", {{"layer", "a"}, {"version", "2"}, {"code", "OK"}})->value, 1);
  EXPECT_EQ(FindMetric(r, "attnserve_requests_total", {{"layer", "a"}, {"version", ""}, {"code", "NOT_FOUND"}})->value,
            1);
  const auto duration = FindMetric(r, "attnserve_request_duration_seconds", {{"layer", "a"}, {"version", "1"}});
  EXPECT_EQ(duration->sample_count, 3u);
  EXPECT_NEAR(duration->value, 0.0041, 1e-12);
  EXPECT_EQ(FindMetric(r, "attnserve_request_duration_seconds", {{"layer", "a"}, {"version", "2"}})->sample_count, 1u);
}

// A layer reloaded without end keeps the series of its kVersionsKept newest versions only; a new version's OK
// series exists from the moment it serves.
TEST(ServerMetricsTest, SeriesOfOldVersionsEnd) {
  ServerMetrics metrics({"a"});
  const int64_t last = ServerMetrics::kVersionsKept + 10;
  for (int64_t v = 1; v <= last; ++v) {
    metrics.SetLayerVersion("a", v);
    metrics.RequestDone("a", v, absl::StatusCode::kOk, 0.001);
    metrics.RequestDone("a", v, absl::StatusCode::kInvalidArgument, 0.001);
  }
  metrics.RequestDone("a", 0, absl::StatusCode::kNotFound, 0);  // none chosen: never evicts what it uses
  metrics.SetLayerVersion("a", last + 1);
  const prometheus::Registry& r = *metrics.registry();
  EXPECT_EQ(FindMetric(r, "attnserve_requests_total", {{"layer", "a"}, {"version", std::to_string(last + 1)},
                                                       {"code", "OK"}})
                ->value,
            0);
  EXPECT_EQ(FindMetric(r, "attnserve_requests_total", {{"layer", "a"}, {"version", ""}, {"code", "NOT_FOUND"}})->value,
            1);
  int versions_with_series = 0;
  for (int64_t v = 1; v <= last; ++v) {
    const auto ok = FindMetric(r, "attnserve_requests_total", {{"layer", "a"}, {"version", std::to_string(v)},
                                                               {"code", "OK"}});
    const auto duration =
        FindMetric(r, "attnserve_request_duration_seconds", {{"layer", "a"}, {"version", std::to_string(v)}});
    EXPECT_EQ(ok.has_value(), duration.has_value()) << v;
    if (ok.has_value()) {
      ++versions_with_series;
      EXPECT_EQ(ok->value, 1) << v;
      EXPECT_GT(v, last - ServerMetrics::kVersionsKept) << "an old version kept its series";
    }
  }
  EXPECT_EQ(versions_with_series, ServerMetrics::kVersionsKept - 1);  // and the newest, last + 1
  // A request that finishes on a version whose series already ended gets one again, and ends nothing newer.
  metrics.RequestDone("a", 1, absl::StatusCode::kOk, 0.001);
  EXPECT_EQ(FindMetric(r, "attnserve_requests_total", {{"layer", "a"}, {"version", "1"}, {"code", "OK"}})->value, 1);
  EXPECT_TRUE(FindMetric(r, "attnserve_requests_total", {{"layer", "a"}, {"version", std::to_string(last - 14)},
                                                         {"code", "OK"}})
                  .has_value());
}

// A client cannot grow the label set: every unknown layer name lands in one series.
TEST(ServerMetricsTest, UnknownLayersShareOneSeries) {
  ServerMetrics metrics({"a"});
  for (int i = 0; i < 100; ++i) metrics.RequestDone("nope" + std::to_string(i), i, absl::StatusCode::kNotFound, 0);
  const prometheus::Registry& r = *metrics.registry();
  EXPECT_EQ(FindMetric(r, "attnserve_requests_total", {{"layer", "<unknown>"}, {"version", ""}, {"code", "NOT_FOUND"}})
                ->value,
            100);
  EXPECT_FALSE(FindMetric(r, "attnserve_requests_total", {{"layer", "nope1"}, {"version", ""}, {"code", "NOT_FOUND"}})
                   .has_value());
}

// Both reasons are exported from the start (rate() sees the first trim), each counted apart.
TEST(ServerMetricsTest, HeapTrimsByReason) {
  ServerMetrics metrics({"a"});
  const prometheus::Registry& r = *metrics.registry();
  EXPECT_EQ(FindMetric(r, "attnserve_heap_trims_total", {{"reason", "growth"}})->value, 0);
  EXPECT_EQ(FindMetric(r, "attnserve_heap_trims_total", {{"reason", "idle"}})->value, 0);
  metrics.HeapTrimmed("growth");
  metrics.HeapTrimmed("growth");
  metrics.HeapTrimmed("idle");
  EXPECT_EQ(FindMetric(r, "attnserve_heap_trims_total", {{"reason", "growth"}})->value, 2);
  EXPECT_EQ(FindMetric(r, "attnserve_heap_trims_total", {{"reason", "idle"}})->value, 1);
}

TEST(ServerMetricsTest, LayersAddedWhileServing) {
  ServerMetrics metrics({"a"});
  metrics.RequestDone("b", 1, absl::StatusCode::kOk, 0.01);  // not yet a layer
  metrics.AddLayer("b");
  metrics.AddLayer("b");  // idempotent
  metrics.RequestDone("b", 1, absl::StatusCode::kOk, 0.01);
  metrics.BatchDone("b", 3, 48, 0.002, 1e6);
  metrics.SetQueueDepth("b", 7);
  metrics.SetQueueCapacity("b", 96);
  metrics.SetInflightBatches(2);
  const prometheus::Registry& r = *metrics.registry();
  EXPECT_EQ(FindMetric(r, "attnserve_requests_total", {{"layer", "b"}, {"version", "1"}, {"code", "OK"}})->value, 1);
  EXPECT_EQ(FindMetric(r, "attnserve_requests_total", {{"layer", "<unknown>"}, {"version", ""}, {"code", "OK"}})->value,
            1);
  EXPECT_EQ(FindMetric(r, "attnserve_flops_total", {{"layer", "b"}})->value, 1e6);
  EXPECT_EQ(FindMetric(r, "attnserve_batch_tokens", {{"layer", "b"}})->value, 48);
  EXPECT_EQ(FindMetric(r, "attnserve_queue_depth", {{"layer", "b"}})->value, 7);
  EXPECT_EQ(FindMetric(r, "attnserve_queue_capacity", {{"layer", "b"}})->value, 96);
  EXPECT_EQ(FindMetric(r, "attnserve_inflight_batches", {})->value, 2);
}

TEST(ServerMetricsTest, ServesTheTextFormat) {
  ServerMetrics metrics({"a"});
  metrics.SetLayerVersion("a", 1);
  metrics.InflightAdd(1);
  ASSERT_TRUE(metrics.Serve("127.0.0.1:0").ok());
  ASSERT_GT(metrics.port(), 0);
  absl::StatusOr<std::string> body = testing::HttpGet("127.0.0.1", metrics.port(), "/metrics");
  ASSERT_TRUE(body.ok()) << body.status();
  for (const char* line : {"attnserve_inflight_requests 1", "attnserve_inflight_batches 0",
                           "attnserve_requests_total{code=\"OK\",layer=\"a\",version=\"1\"} 0"}) {
    EXPECT_NE(body->find(line), std::string::npos) << line << "\n" << *body;
  }
  ServerMetrics second({"a"});
  const absl::Status taken = second.Serve("127.0.0.1:" + std::to_string(metrics.port()));
  EXPECT_EQ(taken.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(taken.message().find("cannot listen"), absl::string_view::npos) << taken;
}

}  // namespace
}  // namespace attnserve
