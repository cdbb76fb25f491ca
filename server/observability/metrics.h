// The server's Prometheus metrics (prometheus-cpp), served on --metrics-address at /metrics.
//
//   attnserve_requests_total{layer,version,code}    counter   every answered request, by status code
//   attnserve_request_duration_seconds{layer,version} histogram arrival to answer
//   attnserve_queue_duration_seconds{layer}         histogram arrival to the start of its batch's compute
//   attnserve_compute_duration_seconds{layer}       histogram per executed batch
//   attnserve_batch_size{layer}                     histogram requests per executed batch
//   attnserve_batch_tokens{layer}                   histogram query tokens per executed batch
//   attnserve_queue_depth{layer}                    gauge     requests waiting
//   attnserve_queue_capacity{layer}                 gauge     max_queue_size: waiting requests it holds
//   attnserve_inflight_requests                     gauge     accepted and not yet answered
//   attnserve_inflight_batches                      gauge     batches being computed
//   attnserve_memory_budget_bytes                   gauge     the memory budget
//   attnserve_memory_reserved_bytes                 gauge     what admitted requests hold of it
//   attnserve_flops_total{layer}                    counter   useful floating-point operations computed
//   attnserve_config_reload_total{result}           counter   config file reloads, success or failure
//   attnserve_layer_version{layer}                  gauge     the newest version serving (0: unloaded)
//
// Status codes are labelled with their canonical names (absl::StatusCodeToString: "OK", "NOT_FOUND", ...).
// `version` is the layer version that answered (empty for a request refused before one was chosen: an
// unknown layer or version). Layers can be added while serving (AddLayer); their series are kept after a
// layer is unloaded, so counters never go back. Per layer, the series of the kVersionsKept newest versions
// are kept: a layer reloaded every minute for a year does not grow /metrics (older versions' series end,
// long after their last request was scraped).
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

  static constexpr int kVersionsKept = 16;

  // Requests for a layer without series are counted under layer="<unknown>" (bounded label set); `version`
  // 0: none was chosen.
  void RequestDone(const std::string& layer, int64_t version, absl::StatusCode code, double duration_s);
  void QueueWait(const std::string& layer, double seconds);
  void BatchDone(const std::string& layer, int requests, int64_t tokens, double compute_s, double flops);
  void SetQueueDepth(const std::string& layer, double depth);
  void SetQueueCapacity(const std::string& layer, int64_t requests);
  // The newest version serving (0: unloaded); a new version's OK series start at 0, so rate() sees its
  // first request.
  void SetLayerVersion(const std::string& layer, int64_t version);
  void InflightAdd(double delta) { inflight_->Increment(delta); }
  void ConfigReloaded(bool ok) { (ok ? config_reload_success_ : config_reload_failure_)->Increment(); }
  void ConnectionShed() { connections_shed_->Increment(); }
  void ConnectionsCapped(int64_t n) { connections_capped_->Increment(static_cast<double>(n)); }
  void ConnectionStalled() { connections_stalled_->Increment(); }
  void ResetFloodStopped() { reset_floods_stopped_->Increment(); }
  void SetInflightBatches(int64_t batches) { inflight_batches_->Set(static_cast<double>(batches)); }
  void SetMemoryBudget(int64_t bytes) { memory_budget_->Set(static_cast<double>(bytes)); }
  void SetMemoryReserved(int64_t bytes) { memory_reserved_->Set(static_cast<double>(bytes)); }
  // A malloc_trim by the server's trimmer, by reason ("growth", "idle": runtime/heap_trim_policy.h).
  void HeapTrimmed(const std::string& reason);
  // Sessions (the KV cache): blocks of the pool in use and kept free, open sessions, evictions by reason
  // ("idle_timeout", "pool_full"), and each answered append's duration (phase "decode" for one token,
  // "prefill" for more) and tokens.
  void SetKvCacheBlocks(int64_t used, int64_t free);
  void SetSessionsActive(int64_t sessions) { sessions_active_->Set(static_cast<double>(sessions)); }
  void SessionEvicted(const std::string& reason);
  void AppendDone(bool prefill, double seconds, int64_t tokens);

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }
  // The same requests and batches per layer version, for ModelStatistics.
  LayerStatistics& statistics() { return statistics_; }

 private:
  // One layer version's request series; created and removed under mu_, used only under it (so a removed
  // series is never touched).
  struct VersionSeries {
    prometheus::Histogram* request_duration = nullptr;  // null until the version answers a request
    std::map<int, prometheus::Counter*> requests;       // by absl::StatusCode
  };
  struct LayerSeries {
    prometheus::Histogram* queue_duration;
    prometheus::Histogram* compute_duration;
    prometheus::Histogram* batch_size;
    prometheus::Histogram* batch_tokens;
    prometheus::Gauge* queue_depth;
    prometheus::Gauge* queue_capacity;
    prometheus::Counter* flops;
    prometheus::Gauge* version;
  };
  struct Families;
  void RegisterSessionMetrics(prometheus::Registry& r);
  void RegisterMemoryMetrics(prometheus::Registry& r);
  void RegisterTransportMetrics(prometheus::Registry& r);
  const LayerSeries* Find(const std::string& layer) const ABSL_LOCKS_EXCLUDED(mu_);
  void AddLayerLocked(const std::string& layer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The series of (layer, version), created on first use; the oldest of the layer's are removed past
  // kVersionsKept.
  VersionSeries& VersionLocked(const std::string& layer, int64_t version) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  prometheus::Counter& CounterLocked(const std::string& layer, int64_t version, absl::StatusCode code)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<Families> families_;  // the per-layer families, for AddLayer
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Gauge* inflight_;
  prometheus::Counter* config_reload_success_;
  prometheus::Counter* config_reload_failure_;
  prometheus::Counter* connections_shed_;
  prometheus::Counter* connections_capped_;
  prometheus::Counter* connections_stalled_;
  prometheus::Counter* reset_floods_stopped_;
  prometheus::Gauge* inflight_batches_;
  prometheus::Gauge* memory_budget_;
  prometheus::Gauge* memory_reserved_;
  prometheus::Family<prometheus::Counter>* heap_trims_;
  prometheus::Gauge* kv_blocks_used_;
  prometheus::Gauge* kv_blocks_free_;
  prometheus::Gauge* sessions_active_;
  prometheus::Family<prometheus::Counter>* session_evictions_;
  prometheus::Histogram* append_decode_;
  prometheus::Histogram* append_prefill_;
  prometheus::Counter* append_tokens_;
  mutable absl::Mutex mu_;
  // std::map: a found LayerSeries stays put while other layers are added.
  std::map<std::string, LayerSeries> layers_ ABSL_GUARDED_BY(mu_);
  // By layer name ("<unknown>" included), then version.
  std::map<std::string, std::map<int64_t, VersionSeries>> versions_ ABSL_GUARDED_BY(mu_);
  LayerStatistics statistics_;
  std::unique_ptr<prometheus::Exposer> exposer_;
};

}  // namespace attnserve
