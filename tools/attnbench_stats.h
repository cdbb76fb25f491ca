// What attnbench collects per step: every answered request's latency and status code, and the server's own
// split of its time (Timing) when the answer carries one.
//
// Thread-safety: StepRecorder may be used from any number of threads at once.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "tools/attnbench_histogram.h"

namespace attnserve {

// How one request ended.
struct Outcome {
  int code = 0;  // grpc::StatusCode / google.rpc.Code; 0 = OK
  bool has_timing = false;
  int64_t queue_us = 0;
  int64_t compute_us = 0;
  int32_t batch_size = 0;
  std::string trace_id;  // an error's: the trace id the server returned (client/grpc_status.h ServerTraceId)
};

struct StepStats {
  int64_t ok = 0;
  std::map<std::string, int64_t> errors;  // by status code name, e.g. "UNAVAILABLE"
  // By status code name: the trace id of its first error, for finding it in the server's logs.
  std::map<std::string, std::string> first_error_trace_ids;
  LatencyHistogram latency_ns;            // successful requests only
  LatencyHistogram queue_us;              // server Timing of successful requests that carry one
  LatencyHistogram compute_us;
  LatencyHistogram batch_size;

  int64_t error_count() const;
  int64_t requests() const { return ok + error_count(); }
};

class StepRecorder {
 public:
  void Record(int64_t latency_ns, const Outcome& outcome);
  StepStats Snapshot() const;

 private:
  mutable absl::Mutex mu_;
  StepStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace attnserve
