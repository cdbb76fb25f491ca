#include "tools/attnbench_report.h"

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace attnserve {
namespace {

double Ms(int64_t ns) { return static_cast<double>(ns) / 1e6; }

std::string Load(const StepReport& step) {
  return step.open_loop ? absl::StrFormat("rate=%g", step.target_rate) : absl::StrCat("c=", step.concurrency);
}

std::string ErrorList(const std::map<std::string, int64_t>& errors, const char* pair_sep, const char* sep) {
  std::vector<std::string> parts;
  for (const auto& [code, n] : errors) parts.push_back(absl::StrCat(code, pair_sep, n));
  return absl::StrJoin(parts, sep);
}

}  // namespace

StepSummary Summarize(const StepReport& step) {
  const StepStats& s = step.stats;
  StepSummary out;
  out.ok = s.ok;
  out.errors = s.error_count();
  out.requests = out.ok + out.errors;
  out.errors_by_code = s.errors;
  out.first_error_trace_ids = s.first_error_trace_ids;
  if (step.elapsed_seconds > 0) {
    out.requests_per_second = static_cast<double>(out.requests) / step.elapsed_seconds;
    out.ok_per_second = static_cast<double>(out.ok) / step.elapsed_seconds;
  }
  out.latency_mean_ms = s.latency_ns.mean() / 1e6;
  out.latency_min_ms = Ms(s.latency_ns.min());
  out.latency_p50_ms = Ms(s.latency_ns.Percentile(50));
  out.latency_p90_ms = Ms(s.latency_ns.Percentile(90));
  out.latency_p99_ms = Ms(s.latency_ns.Percentile(99));
  out.latency_p999_ms = Ms(s.latency_ns.Percentile(99.9));
  out.latency_max_ms = Ms(s.latency_ns.max());
  out.server_samples = s.queue_us.count();
  out.queue_mean_us = s.queue_us.mean();
  out.queue_p50_us = static_cast<double>(s.queue_us.Percentile(50));
  out.queue_p99_us = static_cast<double>(s.queue_us.Percentile(99));
  out.compute_mean_us = s.compute_us.mean();
  out.compute_p50_us = static_cast<double>(s.compute_us.Percentile(50));
  out.compute_p99_us = static_cast<double>(s.compute_us.Percentile(99));
  out.batch_size_mean = s.batch_size.mean();
  out.batch_size_max = static_cast<double>(s.batch_size.max());
  return out;
}

std::string FormatTable(const std::vector<StepReport>& steps) {
  std::string out = absl::StrFormat("%-10s %9s %7s %10s %9s %9s %9s %9s %9s %10s %10s %6s\n", "load", "requests",
                                    "errors", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms",
                                    "queue us", "compute us", "batch");
  std::string error_lines;
  for (const StepReport& step : steps) {
    const StepSummary s = Summarize(step);
    // Server columns: p50 of queue and compute, mean batch size; "-" when no answer carried a Timing.
    const bool timed = s.server_samples > 0;
    absl::StrAppendFormat(&out, "%-10s %9d %7d %10.1f %9.2f %9.2f %9.2f %9.2f %9.2f %10s %10s %6s\n", Load(step),
                          s.requests, s.errors, s.requests_per_second, s.latency_p50_ms, s.latency_p90_ms,
                          s.latency_p99_ms, s.latency_p999_ms, s.latency_max_ms,
                          timed ? absl::StrFormat("%.0f", s.queue_p50_us) : "-",
                          timed ? absl::StrFormat("%.0f", s.compute_p50_us) : "-",
                          timed ? absl::StrFormat("%.2f", s.batch_size_mean) : "-");
    if (s.errors > 0) {
      absl::StrAppend(&error_lines, "errors at ", Load(step), ": ", ErrorList(s.errors_by_code, " ", ", "), "\n");
      for (const auto& [code, trace_id] : s.first_error_trace_ids) {
        absl::StrAppend(&error_lines, "  first ", code, ": trace_id ", trace_id, "\n");
      }
    }
  }
  if (!steps.empty()) absl::StrAppend(&out, "(", steps.front().workload, "; latency of successful requests; ",
                                      "queue/compute: server p50)\n");
  return out + error_lines;
}

std::string FormatJson(const std::vector<StepReport>& steps) {
  nlohmann::json array = nlohmann::json::array();
  for (const StepReport& step : steps) {
    const StepSummary s = Summarize(step);
    nlohmann::json j;
    j["workload"] = step.workload;
    j["mode"] = step.open_loop ? "open" : "closed";
    if (step.open_loop) {
      j["rate"] = step.target_rate;
    } else {
      j["concurrency"] = step.concurrency;
    }
    j["duration_s"] = step.elapsed_seconds;
    j["requests"] = s.requests;
    j["ok"] = s.ok;
    j["errors"] = s.errors;
    j["errors_by_code"] = nlohmann::json::object();
    for (const auto& [code, n] : s.errors_by_code) j["errors_by_code"][code] = n;
    j["first_error_trace_ids"] = nlohmann::json::object();
    for (const auto& [code, id] : s.first_error_trace_ids) j["first_error_trace_ids"][code] = id;
    j["requests_per_second"] = s.requests_per_second;
    j["ok_per_second"] = s.ok_per_second;
    j["latency_ms"] = {{"mean", s.latency_mean_ms}, {"min", s.latency_min_ms}, {"p50", s.latency_p50_ms},
                       {"p90", s.latency_p90_ms},   {"p99", s.latency_p99_ms}, {"p99_9", s.latency_p999_ms},
                       {"max", s.latency_max_ms}};
    j["server"] = {{"samples", s.server_samples},
                   {"queue_us", {{"mean", s.queue_mean_us}, {"p50", s.queue_p50_us}, {"p99", s.queue_p99_us}}},
                   {"compute_us", {{"mean", s.compute_mean_us}, {"p50", s.compute_p50_us}, {"p99", s.compute_p99_us}}},
                   {"batch_size", {{"mean", s.batch_size_mean}, {"max", s.batch_size_max}}}};
    if (step.prefills > 0) j["prefill"] = {{"completed", step.prefills}, {"seconds_mean", step.prefill_seconds_mean}};
    array.push_back(std::move(j));
  }
  return array.dump(2) + "\n";
}

std::string FormatCsv(const std::vector<StepReport>& steps) {
  std::string out =
      "workload,mode,concurrency,rate,duration_s,requests,ok,errors,errors_by_code,requests_per_second,"
      "ok_per_second,latency_mean_ms,latency_min_ms,latency_p50_ms,latency_p90_ms,latency_p99_ms,"
      "latency_p99_9_ms,latency_max_ms,server_samples,queue_mean_us,queue_p50_us,queue_p99_us,compute_mean_us,"
      "compute_p50_us,compute_p99_us,batch_size_mean,batch_size_max\n";
  for (const StepReport& step : steps) {
    const StepSummary s = Summarize(step);
    // The workload text has no commas or quotes (it is built by attnbench), so it needs no CSV quoting.
    absl::StrAppendFormat(&out, "%s,%s,%d,%g,%.3f,%d,%d,%d,%s,%.3f,%.3f,%.4f,%.4f,%.4f,%.4f,%.4f,%.4f,%.4f,%d,"
                                "%.1f,%.1f,%.1f,%.1f,%.1f,%.1f,%.3f,%.0f\n",
                          step.workload, step.open_loop ? "open" : "closed", step.open_loop ? 0 : step.concurrency,
                          step.open_loop ? step.target_rate : 0.0, step.elapsed_seconds, s.requests, s.ok, s.errors,
                          ErrorList(s.errors_by_code, ":", ";"), s.requests_per_second, s.ok_per_second,
                          s.latency_mean_ms, s.latency_min_ms, s.latency_p50_ms, s.latency_p90_ms, s.latency_p99_ms,
                          s.latency_p999_ms, s.latency_max_ms, s.server_samples, s.queue_mean_us, s.queue_p50_us,
                          s.queue_p99_us, s.compute_mean_us, s.compute_p50_us, s.compute_p99_us, s.batch_size_mean,
                          s.batch_size_max);
  }
  return out;
}

}  // namespace attnserve
