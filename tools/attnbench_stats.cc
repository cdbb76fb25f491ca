#include "tools/attnbench_stats.h"

#include "client/grpc_status.h"

namespace attnserve {

int64_t StepStats::error_count() const {
  int64_t n = 0;
  for (const auto& [code, count] : errors) n += count;
  return n;
}

void StepRecorder::Record(int64_t latency_ns, const Outcome& outcome) {
  absl::MutexLock lock(&mu_);
  if (outcome.code != 0) {
    const std::string code = StatusCodeName(outcome.code);
    if (++stats_.errors[code] == 1 && !outcome.trace_id.empty()) stats_.first_error_trace_ids[code] = outcome.trace_id;
    return;
  }
  ++stats_.ok;
  stats_.latency_ns.Record(latency_ns);
  if (outcome.has_timing) {
    stats_.queue_us.Record(outcome.queue_us);
    stats_.compute_us.Record(outcome.compute_us);
    stats_.batch_size.Record(outcome.batch_size);
  }
}

StepStats StepRecorder::Snapshot() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

}  // namespace attnserve
