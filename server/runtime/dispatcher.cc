#include "server/runtime/dispatcher.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/log_string.h"

namespace attnserve {

absl::StatusOr<std::unique_ptr<Dispatcher>> Dispatcher::Create(const Options& options) {
  if (options.registry == nullptr || options.scheduler == nullptr || options.clock == nullptr) {
    return absl::InvalidArgumentError("Dispatcher: registry, scheduler and clock are required");
  }
  return std::unique_ptr<Dispatcher>(new Dispatcher(options));
}

namespace {

// Warnings about failed requests are what a flood of bad requests would multiply.
LogRateLimiter& FailedRequestLines() {
  static LogRateLimiter* const limiter = new LogRateLimiter(/*lines_per_second=*/20);
  return *limiter;
}

// The request's line: client strings bounded and escaped, failures rate-limited, the trace ids added by
// the log format.
void LogAnswer(const InferenceCall& call, const absl::Status& status, double seconds) {
  const ScopedLogTrace trace(call.trace);
  if (status.ok()) {
    if (!spdlog::should_log(spdlog::level::debug)) return;
    spdlog::debug("infer layer={} id={} ok total_us={} queue_us={} compute_us={} batch={}",
                  BoundedForLog(call.layer_name), BoundedForLog(call.id), static_cast<int64_t>(seconds * 1e6),
                  call.timing.queue_us, call.timing.compute_us, call.timing.batch_size);
    return;
  }
  int64_t dropped = 0;
  if (!FailedRequestLines().Allow(absl::Now(), &dropped)) return;
  spdlog::warn("infer layer={} id={} code={} error={}{}", BoundedForLog(call.layer_name), BoundedForLog(call.id),
               absl::StatusCodeToString(status.code()), BoundedForLog(status.message(), 512),
               dropped > 0 ? absl::StrCat(" (", dropped, " similar lines dropped)") : "");
}

// Only calls that found their layer: unknown names must not grow the statistics.
void RecordStatistics(const InferenceCall& call, bool ok, double seconds, LayerStatistics& statistics) {
  statistics.RequestDone(call.layer_name, call.layer->version, ok, absl::Seconds(seconds),
                         absl::Microseconds(call.timing.queue_us), absl::Microseconds(call.timing.compute_us),
                         call.parsed.batch, absl::Now());
}

int64_t AnswerBytes(const AttentionOutputs& outputs) {
  return static_cast<int64_t>((outputs.output.values.size() + outputs.attn_weights.values.size()) * sizeof(float));
}

void RecordAccess(const InferenceCall& call, const absl::Status& status, double seconds, AccessLog& log) {
  AccessRecord r;
  r.time = absl::Now();
  r.rpc = call.rpc;
  r.layer = call.layer_name;
  r.version = call.layer ? call.layer->version : 0;
  r.id = call.id;
  r.code = status.code();
  r.request_bytes = call.request_bytes;
  r.answer_bytes = status.ok() ? AnswerBytes(call.outputs) : 0;
  r.total_us = static_cast<int64_t>(seconds * 1e6);
  r.queue_us = call.timing.queue_us;
  r.compute_us = call.timing.compute_us;
  r.batch = call.timing.batch_size;
  r.trace_id = call.trace.trace_id;
  r.span_id = call.trace.span_id;
  log.Record(std::move(r));
}

}  // namespace

void Dispatcher::Instrument(InferenceCall& call) {
  if (call.instrumented) return;
  call.instrumented = true;
  ServerMetrics* metrics = options_.metrics;
  if (metrics) metrics->InflightAdd(1);
  call.finish = [metrics, access_log = options_.access_log, clock = options_.clock, answer = std::move(call.finish),
                 call = &call](const absl::Status& status) {
    const double seconds = absl::ToDoubleSeconds(clock->Now() - call->arrival);
    if (metrics) {
      metrics->RequestDone(call->layer_name, call->layer ? call->layer->version : 0, status.code(), seconds);
      metrics->InflightAdd(-1);
      if (call->layer != nullptr) RecordStatistics(*call, status.ok(), seconds, metrics->statistics());
    }
    LogAnswer(*call, status, seconds);
    if (access_log) RecordAccess(*call, status, seconds, *access_log);
    answer(status);  // last: the call may be destroyed by it
  };
}

void Dispatcher::Submit(std::unique_ptr<InferenceCall> call) {
  if (!call->internal) Instrument(*call);
  if (shutting_down()) {
    call->finish(absl::UnavailableError("server is shutting down"));
    return;
  }
  if (call->session == nullptr) {
    if (absl::Status s = ValidateCall(*options_.registry, call.get()); !s.ok()) {
      call->finish(s);
      return;
    }
  }
  if (options_.memory != nullptr) {
    // A session's append may hold part of it already (the request it queued with): the rest.
    const int64_t cost = CallCostBytes(*call);
    absl::StatusOr<MemoryBudget::Reservation> reserved =
        options_.memory->Reserve(std::max<int64_t>(0, cost - call->memory.bytes()));
    if (!reserved.ok()) {
      call->finish(reserved.status());
      return;
    }
    call->memory.Absorb(std::move(*reserved));
  }
  const std::string& queue = call->layer_name;
  const int64_t tokens = call->session != nullptr ? call->session->append.tokens : call->parsed.query_tokens();
  if (absl::Status s = options_.scheduler->Schedule(queue, call, tokens); !s.ok()) {
    call->finish(s);  // `call` is left untouched on error
  }
}

}  // namespace attnserve
