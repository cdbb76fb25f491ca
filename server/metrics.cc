#include "server/metrics.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace attnserve {
namespace {

// 50 us to 10 s: 1-2-5 steps per decade.
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  prometheus::Histogram::BucketBoundaries b;
  for (double decade = 1e-5; decade < 10.0; decade *= 10) {
    for (double step : {1.0, 2.0, 5.0}) {
      const double v = decade * step;
      if (v >= 50e-6 - 1e-12 && v <= 10.0 + 1e-9) b.push_back(v);
    }
  }
  b.push_back(10.0);
  return b;
}

prometheus::Histogram::BucketBoundaries PowersOfTwo(double max) {
  prometheus::Histogram::BucketBoundaries b;
  for (double v = 1; v <= max; v *= 2) b.push_back(v);
  return b;
}

std::string CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::OK: return "OK";
    case grpc::CANCELLED: return "CANCELLED";
    case grpc::UNKNOWN: return "UNKNOWN";
    case grpc::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::NOT_FOUND: return "NOT_FOUND";
    case grpc::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::ABORTED: return "ABORTED";
    case grpc::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::INTERNAL: return "INTERNAL";
    case grpc::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::DATA_LOSS: return "DATA_LOSS";
    case grpc::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return absl::StrCat(static_cast<int>(code));
  }
}

}  // namespace

ServerMetrics::ServerMetrics(const std::vector<std::string>& layers)
    : registry_(std::make_shared<prometheus::Registry>()) {
  using prometheus::BuildCounter;
  using prometheus::BuildGauge;
  using prometheus::BuildHistogram;
  requests_ = &BuildCounter()
                   .Name("attnserve_requests_total")
                   .Help("Answered inference requests by layer and gRPC status code")
                   .Register(*registry_);
  auto& request_duration = BuildHistogram()
                               .Name("attnserve_request_duration_seconds")
                               .Help("Time from a request's arrival to its answer")
                               .Register(*registry_);
  auto& queue_duration = BuildHistogram()
                             .Name("attnserve_queue_duration_seconds")
                             .Help("Time a request waited in its layer's queue before its batch started")
                             .Register(*registry_);
  auto& compute_duration = BuildHistogram()
                               .Name("attnserve_compute_duration_seconds")
                               .Help("Compute time of each executed batch")
                               .Register(*registry_);
  auto& batch_size =
      BuildHistogram().Name("attnserve_batch_size").Help("Requests per executed batch").Register(*registry_);
  auto& batch_tokens =
      BuildHistogram().Name("attnserve_batch_tokens").Help("Query tokens per executed batch").Register(*registry_);
  auto& queue_depth =
      BuildGauge().Name("attnserve_queue_depth").Help("Requests waiting in the layer's queue").Register(*registry_);
  inflight_ = &BuildGauge()
                   .Name("attnserve_inflight_requests")
                   .Help("Requests accepted and not yet answered")
                   .Register(*registry_)
                   .Add({});
  auto& flops = BuildCounter()
                    .Name("attnserve_flops_total")
                    .Help("Useful floating-point operations computed (projections and attention matmuls)")
                    .Register(*registry_);
  const auto latency = LatencyBuckets();
  for (const std::string& name : layers) {
    const prometheus::Labels l{{"layer", name}};
    layers_[name] = LayerSeries{&request_duration.Add(l, latency), &queue_duration.Add(l, latency),
                                &compute_duration.Add(l, latency), &batch_size.Add(l, PowersOfTwo(1024)),
                                &batch_tokens.Add(l, PowersOfTwo(1 << 20)), &queue_depth.Add(l),
                                &flops.Add(l)};
    request_counters_[{name, 0}] = &requests_->Add({{"layer", name}, {"code", "OK"}});
  }
}

absl::Status ServerMetrics::Serve(const std::string& address) {
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(address);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("metrics_address ", address, ": cannot listen: ", e.what()));
  }
  exposer_->RegisterCollectable(registry_);
  return absl::OkStatus();
}

int ServerMetrics::port() const {
  if (!exposer_) return 0;
  auto ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports[0];
}

const ServerMetrics::LayerSeries* ServerMetrics::Find(const std::string& layer) const {
  auto it = layers_.find(layer);
  return it == layers_.end() ? nullptr : &it->second;
}

void ServerMetrics::RequestDone(const std::string& layer, grpc::StatusCode code, double duration_s) {
  prometheus::Counter* counter;
  {
    absl::MutexLock lock(&mu_);
    // Unknown layer names are folded into one series so a client cannot grow the label set without bound.
    const std::string key_layer = Find(layer) ? layer : "<unknown>";
    auto& slot = request_counters_[{key_layer, static_cast<int>(code)}];
    if (slot == nullptr) slot = &requests_->Add({{"layer", key_layer}, {"code", CodeName(code)}});
    counter = slot;
  }
  counter->Increment();
  if (const LayerSeries* s = Find(layer)) s->request_duration->Observe(duration_s);
}

void ServerMetrics::QueueWait(const std::string& layer, double seconds) {
  if (const LayerSeries* s = Find(layer)) s->queue_duration->Observe(seconds);
}

void ServerMetrics::BatchDone(const std::string& layer, int requests, int64_t tokens, double compute_s,
                              double flops) {
  const LayerSeries* s = Find(layer);
  if (s == nullptr) return;
  s->compute_duration->Observe(compute_s);
  s->batch_size->Observe(requests);
  s->batch_tokens->Observe(static_cast<double>(tokens));
  s->flops->Increment(flops);
}

void ServerMetrics::SetQueueDepth(const std::string& layer, double depth) {
  if (const LayerSeries* s = Find(layer)) s->queue_depth->Set(depth);
}

}  // namespace attnserve
