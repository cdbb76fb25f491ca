#include "server/runtime/dispatcher.h"

#include <spdlog/spdlog.h>

#include <string>
#include <utility>

namespace attnserve {

absl::StatusOr<std::unique_ptr<Dispatcher>> Dispatcher::Create(const Options& options) {
  if (options.registry == nullptr || options.scheduler == nullptr || options.clock == nullptr) {
    return absl::InvalidArgumentError("Dispatcher: registry, scheduler and clock are required");
  }
  return std::unique_ptr<Dispatcher>(new Dispatcher(options));
}

void Dispatcher::Instrument(InferenceCall& call) {
  ServerMetrics* metrics = options_.metrics;
  if (metrics) metrics->InflightAdd(1);
  call.finish = [metrics, clock = options_.clock, answer = std::move(call.finish), call = &call](
                    const absl::Status& status) {
    const double seconds = absl::ToDoubleSeconds(clock->Now() - call->arrival);
    if (metrics) {
      metrics->RequestDone(call->layer_name, status.code(), seconds);
      metrics->InflightAdd(-1);
    }
    if (status.ok()) {
      spdlog::debug("infer layer={} id={} ok total_us={} queue_us={} compute_us={} batch={}", call->layer_name,
                    call->id, static_cast<int64_t>(seconds * 1e6), call->timing.queue_us, call->timing.compute_us,
                    call->timing.batch_size);
    } else {
      spdlog::warn("infer layer={} id={} code={} error={}", call->layer_name, call->id,
                   absl::StatusCodeToString(status.code()), std::string(status.message()));
    }
    answer(status);  // last: the call may be destroyed by it
  };
}

void Dispatcher::Submit(std::unique_ptr<InferenceCall> call) {
  Instrument(*call);
  if (shutting_down()) {
    call->finish(absl::UnavailableError("server is shutting down"));
    return;
  }
  if (absl::Status s = ValidateCall(*options_.registry, call.get()); !s.ok()) {
    call->finish(s);
    return;
  }
  const std::string& queue = call->layer_name;
  const int64_t tokens = call->parsed.query_tokens();
  if (absl::Status s = options_.scheduler->Schedule(queue, call, tokens); !s.ok()) {
    call->finish(s);  // `call` is left untouched on error
  }
}

}  // namespace attnserve
