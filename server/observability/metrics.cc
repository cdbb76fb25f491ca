#include "server/observability/metrics.h"

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

const prometheus::Histogram::BucketBoundaries& LatencyBoundaries() {
  static const auto* const latency = new prometheus::Histogram::BucketBoundaries(LatencyBuckets());
  return *latency;
}

constexpr const char* kUnknownLayer = "<unknown>";

// Version 0 (none chosen) is an empty label, which Prometheus reads as no label.
prometheus::Labels VersionLabels(const std::string& layer, int64_t version) {
  return {{"layer", layer}, {"version", version > 0 ? absl::StrCat(version) : ""}};
}

prometheus::Histogram::BucketBoundaries PowersOfTwo(double max) {
  prometheus::Histogram::BucketBoundaries b;
  for (double v = 1; v <= max; v *= 2) b.push_back(v);
  return b;
}

}  // namespace

struct ServerMetrics::Families {
  prometheus::Family<prometheus::Histogram>* request_duration;
  prometheus::Family<prometheus::Histogram>* queue_duration;
  prometheus::Family<prometheus::Histogram>* compute_duration;
  prometheus::Family<prometheus::Histogram>* batch_size;
  prometheus::Family<prometheus::Histogram>* batch_tokens;
  prometheus::Family<prometheus::Gauge>* queue_depth;
  prometheus::Family<prometheus::Gauge>* queue_capacity;
  prometheus::Family<prometheus::Gauge>* version;
  prometheus::Family<prometheus::Counter>* flops;
};

namespace {

prometheus::Family<prometheus::Histogram>* Histogram(prometheus::Registry& r, const char* name, const char* help) {
  return &prometheus::BuildHistogram().Name(name).Help(help).Register(r);
}

}  // namespace

ServerMetrics::ServerMetrics(const std::vector<std::string>& layers)
    : registry_(std::make_shared<prometheus::Registry>()), families_(std::make_unique<Families>()) {
  prometheus::Registry& r = *registry_;
  requests_ = &prometheus::BuildCounter()
                   .Name("attnserve_requests_total")
                   .Help("Answered inference requests by layer, layer version and status code")
                   .Register(r);
  auto& reloads = prometheus::BuildCounter()
                      .Name("attnserve_config_reload_total")
                      .Help("Config file reloads while serving, by result (success: every layer as the file says)")
                      .Register(r);
  config_reload_success_ = &reloads.Add({{"result", "success"}});
  config_reload_failure_ = &reloads.Add({{"result", "failure"}});
  families_->request_duration =
      Histogram(r, "attnserve_request_duration_seconds", "Time from a request's arrival to its answer");
  families_->queue_duration = Histogram(r, "attnserve_queue_duration_seconds",
                                        "Time a request waited in its layer's queue before its batch started");
  families_->compute_duration =
      Histogram(r, "attnserve_compute_duration_seconds", "Compute time of each executed batch");
  families_->batch_size = Histogram(r, "attnserve_batch_size", "Requests per executed batch");
  families_->batch_tokens = Histogram(r, "attnserve_batch_tokens", "Query tokens per executed batch");
  families_->queue_depth =
      &prometheus::BuildGauge().Name("attnserve_queue_depth").Help("Requests waiting in the layer's queue").Register(r);
  families_->queue_capacity = &prometheus::BuildGauge()
                                  .Name("attnserve_queue_capacity")
                                  .Help("The layer's max_queue_size: requests its queue holds before refusing")
                                  .Register(r);
  families_->version = &prometheus::BuildGauge()
                            .Name("attnserve_layer_version")
                            .Help("The newest version of the layer serving (0: unloaded)")
                            .Register(r);
  inflight_ = &prometheus::BuildGauge()
                   .Name("attnserve_inflight_requests")
                   .Help("Requests accepted and not yet answered")
                   .Register(r)
                   .Add({});
  inflight_batches_ =
      &prometheus::BuildGauge().Name("attnserve_inflight_batches").Help("Batches being computed").Register(r).Add({});
  RegisterMemoryMetrics(r);
  RegisterSessionMetrics(r);
  RegisterTransportMetrics(r);
  families_->flops = &prometheus::BuildCounter()
                          .Name("attnserve_flops_total")
                          .Help("Useful floating-point operations computed (projections and attention matmuls)")
                          .Register(r);
  absl::MutexLock lock(&mu_);
  for (const std::string& name : layers) AddLayerLocked(name);
}

ServerMetrics::~ServerMetrics() = default;

void ServerMetrics::RegisterMemoryMetrics(prometheus::Registry& r) {
  memory_budget_ = &prometheus::BuildGauge()
                        .Name("attnserve_memory_budget_bytes")
                        .Help("Bytes admitted requests may hold at once (memory_budget_bytes)")
                        .Register(r)
                        .Add({});
  memory_reserved_ = &prometheus::BuildGauge()
                          .Name("attnserve_memory_reserved_bytes")
                          .Help("Bytes of the memory budget held by admitted requests")
                          .Register(r)
                          .Add({});
  heap_trims_ = &prometheus::BuildCounter()
                     .Name("attnserve_heap_trims_total")
                     .Help("Times malloc's free pages were given back to the system: reason=\"growth\" (the RSS "
                           "rose past its step), \"idle\" (no request held memory)")
                     .Register(r);
  for (const char* reason : {"growth", "idle"}) heap_trims_->Add({{"reason", reason}});
}

void ServerMetrics::RegisterTransportMetrics(prometheus::Registry& r) {
  connections_shed_ = &prometheus::BuildCounter()
                           .Name("attnserve_connections_shed_total")
                           .Help("Connections the memory guard shut down: RSS over its limit, and they held the "
                                 "most bytes not delivered as messages")
                           .Register(r)
                           .Add({});
  connections_capped_ = &prometheus::BuildCounter()
                             .Name("attnserve_connections_capped_total")
                             .Help("Connections shut down beyond transport.max_connections (those that sent least)")
                             .Register(r)
                             .Add({});
  connections_stalled_ = &prometheus::BuildCounter()
                             .Name("attnserve_connections_stalled_total")
                             .Help("Connections shut down for bytes the server stopped reading, none delivered as a "
                                   "message (transport.stalled_read_timeout_ms)")
                             .Register(r)
                             .Add({});
  reset_floods_stopped_ = &prometheus::BuildCounter()
                               .Name("attnserve_reset_floods_stopped_total")
                               .Help("Connections shut down for opening streams and resetting them before any "
                                     "message (rapid reset, CVE-2023-44487)")
                               .Register(r)
                               .Add({});
}

void ServerMetrics::AddLayer(const std::string& layer) {
  absl::MutexLock lock(&mu_);
  AddLayerLocked(layer);
}

void ServerMetrics::AddLayerLocked(const std::string& name) {
  if (layers_.count(name) > 0) return;
  const prometheus::Labels l{{"layer", name}};
  const Families& f = *families_;
  layers_[name] = LayerSeries{&f.queue_duration->Add(l, LatencyBoundaries()),
                              &f.compute_duration->Add(l, LatencyBoundaries()),
                              &f.batch_size->Add(l, PowersOfTwo(1024)),
                              &f.batch_tokens->Add(l, PowersOfTwo(1 << 20)),
                              &f.queue_depth->Add(l),
                              &f.queue_capacity->Add(l),
                              &f.flops->Add(l),
                              &f.version->Add(l)};
}

ServerMetrics::VersionSeries& ServerMetrics::VersionLocked(const std::string& layer, int64_t version) {
  std::map<int64_t, VersionSeries>& of_layer = versions_[layer];
  auto [it, added] = of_layer.try_emplace(version);
  if (!added) return it->second;
  // Version 0 (none chosen) is one series whatever happens; past kVersionsKept real versions the oldest goes,
  // unless the one added is it (a request that finished long after 16 reloads): that one goes next time.
  const auto oldest = of_layer.upper_bound(0);
  const int64_t real_versions = static_cast<int64_t>(of_layer.size() - of_layer.count(0));
  if (real_versions > kVersionsKept && oldest != it) {
    if (oldest->second.request_duration) families_->request_duration->Remove(oldest->second.request_duration);
    for (auto& [code, counter] : oldest->second.requests) requests_->Remove(counter);
    of_layer.erase(oldest);
  }
  return it->second;
}

prometheus::Counter& ServerMetrics::CounterLocked(const std::string& layer, int64_t version, absl::StatusCode code) {
  prometheus::Counter*& counter = VersionLocked(layer, version).requests[static_cast<int>(code)];
  if (counter == nullptr) {
    prometheus::Labels labels = VersionLabels(layer, version);
    labels["code"] = absl::StatusCodeToString(code);
    counter = &requests_->Add(labels);
  }
  return *counter;
}

absl::Status ServerMetrics::Serve(const std::string& address, BasicAuthCheck check_basic_auth) {
  try {
    // civetweb's defaults (2 threads, no timeout) let four half-sent requests stall every scrape. Its
    // timeout is per read, so a client trickling a byte at a time holds a thread: enough threads that a
    // few dozen such clients still leave one for Prometheus (a thread costs only its stack).
    exposer_ = std::make_unique<prometheus::Exposer>(std::vector<std::string>{
        "listening_ports", address, "num_threads", "64", "request_timeout_ms", "5000"});
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("metrics_address ", address, ": cannot listen: ", e.what()));
  }
  if (check_basic_auth) exposer_->RegisterAuth(std::move(check_basic_auth), "attnserve");
  exposer_->RegisterCollectable(registry_);
  return absl::OkStatus();
}

int ServerMetrics::port() const {
  if (!exposer_) return 0;
  auto ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports[0];
}

const ServerMetrics::LayerSeries* ServerMetrics::Find(const std::string& layer) const {
  absl::MutexLock lock(&mu_);
  auto it = layers_.find(layer);
  return it == layers_.end() ? nullptr : &it->second;
}

void ServerMetrics::RequestDone(const std::string& layer, int64_t version, absl::StatusCode code,
                                double duration_s) {
  absl::MutexLock lock(&mu_);
  // Unknown layer names are folded into one series so a client cannot grow the label set without bound.
  const bool known = layers_.count(layer) > 0;
  const std::string& key_layer = known ? layer : kUnknownLayer;
  const int64_t key_version = known ? version : 0;
  CounterLocked(key_layer, key_version, code).Increment();
  if (!known) return;
  prometheus::Histogram*& duration = VersionLocked(layer, version).request_duration;
  if (duration == nullptr) {
    duration = &families_->request_duration->Add(VersionLabels(layer, version), LatencyBoundaries());
  }
  duration->Observe(duration_s);
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

void ServerMetrics::SetLayerVersion(const std::string& layer, int64_t version) {
  absl::MutexLock lock(&mu_);
  auto it = layers_.find(layer);
  if (it == layers_.end()) return;
  it->second.version->Set(static_cast<double>(version));
  if (version > 0) CounterLocked(layer, version, absl::StatusCode::kOk);
}

void ServerMetrics::SetQueueDepth(const std::string& layer, double depth) {
  if (const LayerSeries* s = Find(layer)) s->queue_depth->Set(depth);
}

void ServerMetrics::SetQueueCapacity(const std::string& layer, int64_t requests) {
  if (const LayerSeries* s = Find(layer)) s->queue_capacity->Set(static_cast<double>(requests));
}

void ServerMetrics::RegisterSessionMetrics(prometheus::Registry& r) {
  auto& blocks = prometheus::BuildGauge()
                     .Name("attnserve_kv_cache_blocks")
                     .Help("Blocks of the sessions' KV cache pool, in use or kept free for reuse")
                     .Register(r);
  kv_blocks_used_ = &blocks.Add({{"state", "used"}});
  kv_blocks_free_ = &blocks.Add({{"state", "free"}});
  sessions_active_ =
      &prometheus::BuildGauge().Name("attnserve_sessions_active").Help("Open sessions").Register(r).Add({});
  session_evictions_ = &prometheus::BuildCounter()
                            .Name("attnserve_session_evictions_total")
                            .Help("Sessions evicted, by reason (idle_timeout, pool_full)")
                            .Register(r);
  for (const char* reason : {"idle_timeout", "pool_full"}) session_evictions_->Add({{"reason", reason}});
  auto& appends = prometheus::BuildHistogram()
                      .Name("attnserve_append_duration_seconds")
                      .Help("Session appends, arrival to answer: decode (one token) or prefill (more)")
                      .Register(r);
  append_decode_ = &appends.Add({{"phase", "decode"}}, LatencyBuckets());
  append_prefill_ = &appends.Add({{"phase", "prefill"}}, LatencyBuckets());
  append_tokens_ = &prometheus::BuildCounter()
                        .Name("attnserve_append_tokens_total")
                        .Help("Tokens appended to sessions")
                        .Register(r)
                        .Add({});
}

void ServerMetrics::SetKvCacheBlocks(int64_t used, int64_t free) {
  kv_blocks_used_->Set(static_cast<double>(used));
  kv_blocks_free_->Set(static_cast<double>(free));
}

void ServerMetrics::SessionEvicted(const std::string& reason) {
  session_evictions_->Add({{"reason", reason}}).Increment();
}

void ServerMetrics::HeapTrimmed(const std::string& reason) { heap_trims_->Add({{"reason", reason}}).Increment(); }

void ServerMetrics::AppendDone(bool prefill, double seconds, int64_t tokens) {
  (prefill ? append_prefill_ : append_decode_)->Observe(seconds);
  append_tokens_->Increment(static_cast<double>(tokens));
}

}  // namespace attnserve
