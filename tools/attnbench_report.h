// attnbench's output: per step, the same numbers as a table for people, JSON or CSV for tools.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "tools/attnbench_stats.h"

namespace attnserve {

struct StepReport {
  std::string workload;       // what was sent, e.g. "small B=1 L=128 unary"
  bool open_loop = false;
  int64_t concurrency = 0;    // closed loop: workers
  double target_rate = 0;     // open loop: intended requests per second
  double elapsed_seconds = 0;  // measured time (LoopResult::elapsed_seconds)
  StepStats stats;
  // --sessions with --prefill: background prefills completed (warm-up included) and their mean seconds.
  int64_t prefills = 0;
  double prefill_seconds_mean = 0;
};

// The numbers reported for a step, derived once for every format.
struct StepSummary {
  int64_t requests = 0;  // answered, ok or not
  int64_t ok = 0;
  int64_t errors = 0;
  std::map<std::string, int64_t> errors_by_code;
  std::map<std::string, std::string> first_error_trace_ids;  // by code: the server's trace id of its first error
  double requests_per_second = 0;  // every answered request
  double ok_per_second = 0;
  // Latency of successful requests, milliseconds.
  double latency_mean_ms = 0, latency_min_ms = 0, latency_p50_ms = 0, latency_p90_ms = 0, latency_p99_ms = 0,
         latency_p999_ms = 0, latency_max_ms = 0;
  // The server's Timing of successful requests: how many carried one, microseconds, batch sizes.
  int64_t server_samples = 0;
  double queue_mean_us = 0, queue_p50_us = 0, queue_p99_us = 0;
  double compute_mean_us = 0, compute_p50_us = 0, compute_p99_us = 0;
  double batch_size_mean = 0, batch_size_max = 0;
};

StepSummary Summarize(const StepReport& step);

// Aligned columns, one line per step, then one line per step that had errors listing them by code.
std::string FormatTable(const std::vector<StepReport>& steps);
// A JSON array, one object per step with every StepSummary number.
std::string FormatJson(const std::vector<StepReport>& steps);
// A header row, then one row per step; errors_by_code as "CODE:n;CODE:n".
std::string FormatCsv(const std::vector<StepReport>& steps);

}  // namespace attnserve
