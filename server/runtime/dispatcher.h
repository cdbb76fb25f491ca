// The admit stage, shared by every protocol's service: it instruments each call's answer (the
// requests_total and duration metrics, the in-flight gauge, the log line), refuses new calls once shutting
// down (UNAVAILABLE), validates the call against its layer (ValidateCall), reserves what it may cost from the
// memory budget (RESOURCE_EXHAUSTED "memory budget: ..." when it does not fit) and queues it on its layer.
//
// Thread-safety: Submit and StartShutdown may be called from any thread at once.
#pragma once

#include <atomic>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/batching/clock.h"
#include "server/observability/metrics.h"
#include "server/observability/access_log.h"
#include "server/runtime/inference_call.h"
#include "server/runtime/layer_registry.h"

namespace attnserve {

class Dispatcher {
 public:
  struct Options {
    const LayerRegistry* registry = nullptr;  // required
    CallScheduler* scheduler = nullptr;       // required
    ServerMetrics* metrics = nullptr;         // may be null
    MemoryBudget* memory = nullptr;           // may be null: no budget
    AccessLog* access_log = nullptr;          // may be null: no access log
    const Clock* clock = RealClock();         // required
  };
  // None of the pointers is owned; all must outlive the dispatcher. InvalidArgument for a missing one.
  static absl::StatusOr<std::unique_ptr<Dispatcher>> Create(const Options& options);

  // Validates and queues `call`; its `finish` is called exactly once, now (a rejection) or by the worker
  // that computes it. A client's call is instrumented first, unless it was already.
  void Submit(std::unique_ptr<InferenceCall> call);

  // Wraps call->finish with the requests metrics, the in-flight gauge, the log line and the access log, once (a
  // call instrumented already is left as it is). For a call that may be answered before it reaches Submit, or
  // whose answer is put together after its finish is wrapped (a session's append: refused or queued by its
  // session, or computed in chunks).
  void Instrument(InferenceCall& call);

  // From now on Submit answers UNAVAILABLE; calls already queued are still computed.
  void StartShutdown() { shutting_down_.store(true); }
  bool shutting_down() const { return shutting_down_.load(); }

 private:
  explicit Dispatcher(const Options& options) : options_(options) {}

  const Options options_;
  std::atomic<bool> shutting_down_{false};
};

}  // namespace attnserve
