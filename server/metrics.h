// The server's Prometheus metrics (prometheus-cpp), served on --metrics-address at /metrics.
//
//   attnserve_requests_total{layer,code}            counter   every answered Infer request, by gRPC code
//   attnserve_request_duration_seconds{layer}       histogram arrival to answer
//   attnserve_queue_duration_seconds{layer}         histogram arrival to the start of its batch's compute
//   attnserve_compute_duration_seconds{layer}       histogram per executed batch
//   attnserve_batch_size{layer}                     histogram requests per executed batch
//   attnserve_batch_tokens{layer}                   histogram query tokens per executed batch
//   attnserve_queue_depth{layer}                    gauge     requests waiting
//   attnserve_inflight_requests                     gauge     accepted and not yet answered
//   attnserve_flops_total{layer}                    counter   useful floating-point operations computed
//
// Thread-safety: all methods may be called from any thread (prometheus-cpp metrics are atomic; the
// per-layer handles are created up front).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/support/status_code_enum.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace attnserve {

class ServerMetrics {
 public:
  // Registers every family and the per-layer series of `layers`.
  explicit ServerMetrics(const std::vector<std::string>& layers);
  ServerMetrics(const ServerMetrics&) = delete;
  ServerMetrics& operator=(const ServerMetrics&) = delete;

  // Starts the HTTP endpoint on host:port (port 0 picks one; see port()).
  absl::Status Serve(const std::string& address);
  int port() const;

  void RequestDone(const std::string& layer, grpc::StatusCode code, double duration_s);
  void QueueWait(const std::string& layer, double seconds);
  void BatchDone(const std::string& layer, int requests, int64_t tokens, double compute_s, double flops);
  void SetQueueDepth(const std::string& layer, double depth);
  void InflightAdd(double delta) { inflight_->Increment(delta); }

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

 private:
  struct LayerSeries {
    prometheus::Histogram* request_duration;
    prometheus::Histogram* queue_duration;
    prometheus::Histogram* compute_duration;
    prometheus::Histogram* batch_size;
    prometheus::Histogram* batch_tokens;
    prometheus::Gauge* queue_depth;
    prometheus::Counter* flops;
  };
  const LayerSeries* Find(const std::string& layer) const;

  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Gauge* inflight_;
  std::map<std::string, LayerSeries> layers_;
  mutable absl::Mutex mu_;  // guards the lazily created requests_total series
  std::map<std::pair<std::string, int>, prometheus::Counter*> request_counters_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<prometheus::Exposer> exposer_;
};

}  // namespace attnserve
