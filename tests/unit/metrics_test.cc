// ServerMetrics: series by layer and status code, layers added while serving, unknown layers folded into
// one series, and the /metrics endpoint.
#include "server/observability/metrics.h"

#include "gtest/gtest.h"
#include "tests/testing/http_get.h"
#include "tests/testing/metric_values.h"

namespace attnserve {
namespace {

using testing::FindMetric;

TEST(ServerMetricsTest, RequestsByLayerAndCodeName) {
  ServerMetrics metrics({"a"});
  metrics.RequestDone("a", absl::StatusCode::kOk, 0.001);
  metrics.RequestDone("a", absl::StatusCode::kOk, 0.003);
  metrics.RequestDone("a", absl::StatusCode::kResourceExhausted, 0.0001);
  const prometheus::Registry& r = *metrics.registry();
  EXPECT_EQ(FindMetric(r, "attnserve_requests_total", {{"layer", "a"}, {"code", "OK"}})->value, 2);
  EXPECT_EQ(FindMetric(r, "attnserve_requests_total", {{"layer", "a"}, {"code", "RESOURCE_EXHAUSTED"}})->value, 1);
  const auto duration = FindMetric(r, "attnserve_request_duration_seconds", {{"layer", "a"}});
  EXPECT_EQ(duration->sample_count, 3u);
  EXPECT_NEAR(duration->value, 0.0041, 1e-12);
}

// A client cannot grow the label set: every unknown layer name lands in one series.
TEST(ServerMetricsTest, UnknownLayersShareOneSeries) {
  ServerMetrics metrics({"a"});
  for (int i = 0; i < 100; ++i) metrics.RequestDone("nope" + std::to_string(i), absl::StatusCode::kNotFound, 0);
  const prometheus::Registry& r = *metrics.registry();
  EXPECT_EQ(FindMetric(r, "attnserve_requests_total", {{"layer", "<unknown>"}, {"code", "NOT_FOUND"}})->value, 100);
  EXPECT_FALSE(FindMetric(r, "attnserve_requests_total", {{"layer", "nope1"}, {"code", "NOT_FOUND"}}).has_value());
}

TEST(ServerMetricsTest, LayersAddedWhileServing) {
  ServerMetrics metrics({"a"});
  metrics.RequestDone("b", absl::StatusCode::kOk, 0.01);  // not yet a layer
  metrics.AddLayer("b");
  metrics.AddLayer("b");  // idempotent
  metrics.RequestDone("b", absl::StatusCode::kOk, 0.01);
  metrics.BatchDone("b", 3, 48, 0.002, 1e6);
  metrics.SetQueueDepth("b", 7);
  metrics.SetInflightBatches(2);
  const prometheus::Registry& r = *metrics.registry();
  EXPECT_EQ(FindMetric(r, "attnserve_requests_total", {{"layer", "b"}, {"code", "OK"}})->value, 1);
  EXPECT_EQ(FindMetric(r, "attnserve_requests_total", {{"layer", "<unknown>"}, {"code", "OK"}})->value, 1);
  EXPECT_EQ(FindMetric(r, "attnserve_flops_total", {{"layer", "b"}})->value, 1e6);
  EXPECT_EQ(FindMetric(r, "attnserve_batch_tokens", {{"layer", "b"}})->value, 48);
  EXPECT_EQ(FindMetric(r, "attnserve_queue_depth", {{"layer", "b"}})->value, 7);
  EXPECT_EQ(FindMetric(r, "attnserve_inflight_batches", {})->value, 2);
}

TEST(ServerMetricsTest, ServesTheTextFormat) {
  ServerMetrics metrics({"a"});
  metrics.InflightAdd(1);
  ASSERT_TRUE(metrics.Serve("127.0.0.1:0").ok());
  ASSERT_GT(metrics.port(), 0);
  absl::StatusOr<std::string> body = testing::HttpGet("127.0.0.1", metrics.port(), "/metrics");
  ASSERT_TRUE(body.ok()) << body.status();
  for (const char* line : {"attnserve_inflight_requests 1", "attnserve_inflight_batches 0",
                           "attnserve_requests_total{code=\"OK\",layer=\"a\"} 0"}) {
    EXPECT_NE(body->find(line), std::string::npos) << line << "\n" << *body;
  }
  ServerMetrics second({"a"});
  const absl::Status taken = second.Serve("127.0.0.1:" + std::to_string(metrics.port()));
  EXPECT_EQ(taken.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(taken.message().find("cannot listen"), absl::string_view::npos) << taken;
}

}  // namespace
}  // namespace attnserve
