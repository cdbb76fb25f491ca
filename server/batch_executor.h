// The compute stage: runs one closed batch of a layer through the engine's ragged API and answers every
// request in it. Requests cancelled or past their deadline while queued are answered without compute.
//
// Thread-safety: Run may be called from several worker threads at once.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "server/batch_scheduler.h"
#include "server/clock.h"
#include "server/inference_call.h"
#include "server/metrics.h"

namespace attnserve {

using CallScheduler = BatchScheduler<std::unique_ptr<InferenceCall>>;

class BatchExecutor {
 public:
  // Neither is owned; both must outlive the executor. `metrics` may be null.
  BatchExecutor(ServerMetrics* metrics, const Clock* clock) : metrics_(metrics), clock_(clock) {}

  void Run(const std::string& layer, std::vector<CallScheduler::Entry> batch) const;

 private:
  ServerMetrics* metrics_;
  const Clock* clock_;
};

}  // namespace attnserve
