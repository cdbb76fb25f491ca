// The server's Prometheus metrics (prometheus-cpp), served on --metrics-address at /metrics.
//
//   attnserve_requests_total{layer,code}            counter   every answered Infer request, by status code
//   attnserve_request_duration_seconds{layer}       histogram arrival to answer
//   attnserve_queue_duration_seconds{layer}         histogram arrival to the start of its batch's compute
//   attnserve_compute_duration_seconds{layer}       histogram per executed batch
//   attnserve_batch_size{layer}                     histogram requests per executed batch
//   attnserve_batch_tokens{layer}                   histogram query tokens per executed batch
//   attnserve_queue_depth{layer}                    gauge     requests waiting
//   attnserve_inflight_requests                     gauge     accepted and not yet answered
//   attnserve_inflight_batches                      gauge     batches being computed
//   attnserve_memory_budget_bytes                   gauge     the memory budget
//   attnserve_memory_reserved_bytes                 gauge     what admitted requests hold of it
//   attnserve_flops_total{layer}                    counter   useful floating-point operations computed
//   attnserve_config_reload_total{result}           counter   config file reloads, success or failure
//   attnserve_layer_version{layer}                  gauge     the newest version serving (0: unloaded)
//
// Status codes are labelled with their canonical names (absl::StatusCodeToString: "OK", "NOT_FOUND", ...).
// Layers can be added while serving (AddLayer); their series are kept after a
// layer is unloaded, so counters never go back.
//
// Thread-safety: all methods may be called from any thread (prometheus-cpp metrics are atomic; the per-layer
// handles are found under a mutex).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/observability/layer_statistics.h"

namespace attnserve {

class ServerMetrics {
 public:
  ~ServerMetrics();
  // Registers every family and the per-layer series of `layers`.
  explicit ServerMetrics(const std::vector<std::string>& layers);
  // The per-layer series of a layer added later; no-op when it has them already.
  void AddLayer(const std::string& layer);
  ServerMetrics(const ServerMetrics&) = delete;
  ServerMetrics& operator=(const ServerMetrics&) = delete;

  // Starts the HTTP endpoint on host:port (port 0 picks one; see port()), with 64 threads and a 5 s read
  // timeout, so that slow or half-sent requests cannot stall a scrape.
  // `check_basic_auth` (user, password) set: /metrics answers 401 unless it returns true; it must outlive
  // the metrics. Empty: /metrics is open.
  using BasicAuthCheck = std::function<bool(const std::string& user, const std::string& password)>;
  absl::Status Serve(const std::string& address, BasicAuthCheck check_basic_auth = {});
  int port() const;

  // Requests for a layer without series are counted under layer="<unknown>" (bounded label set).
  void RequestDone(const std::string& layer, absl::StatusCode code, double duration_s);
  void QueueWait(const std::string& layer, double seconds);
  void BatchDone(const std::string& layer, int requests, int64_t tokens, double compute_s, double flops);
  void SetQueueDepth(const std::string& layer, double depth);
  void SetLayerVersion(const std::string& layer, int64_t version);
  void InflightAdd(double delta) { inflight_->Increment(delta); }
  void ConfigReloaded(bool ok) { (ok ? config_reload_success_ : config_reload_failure_)->Increment(); }
  void SetInflightBatches(int64_t batches) { inflight_batches_->Set(static_cast<double>(batches)); }
  void SetMemoryBudget(int64_t bytes) { memory_budget_->Set(static_cast<double>(bytes)); }
  void SetMemoryReserved(int64_t bytes) { memory_reserved_->Set(static_cast<double>(bytes)); }

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }
  // The same requests and batches per layer version, for ModelStatistics.
  LayerStatistics& statistics() { return statistics_; }

 private:
  struct LayerSeries {
    prometheus::Histogram* request_duration;
    prometheus::Histogram* queue_duration;
    prometheus::Histogram* compute_duration;
    prometheus::Histogram* batch_size;
    prometheus::Histogram* batch_tokens;
    prometheus::Gauge* queue_depth;
    prometheus::Counter* flops;
    prometheus::Gauge* version;
  };
  struct Families;
  const LayerSeries* Find(const std::string& layer) const ABSL_LOCKS_EXCLUDED(mu_);
  void AddLayerLocked(const std::string& layer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<Families> families_;  // the per-layer families, for AddLayer
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Gauge* inflight_;
  prometheus::Counter* config_reload_success_;
  prometheus::Counter* config_reload_failure_;
  prometheus::Gauge* inflight_batches_;
  prometheus::Gauge* memory_budget_;
  prometheus::Gauge* memory_reserved_;
  mutable absl::Mutex mu_;
  // std::map: a found LayerSeries stays put while other layers are added.
  std::map<std::string, LayerSeries> layers_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<std::string, int>, prometheus::Counter*> request_counters_ ABSL_GUARDED_BY(mu_);
  LayerStatistics statistics_;
  std::unique_ptr<prometheus::Exposer> exposer_;
};

}  // namespace attnserve
