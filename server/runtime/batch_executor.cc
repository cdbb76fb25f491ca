#include "server/runtime/batch_executor.h"

#include <map>
#include <utility>

#include "absl/strings/str_cat.h"

namespace attnserve {

absl::StatusOr<std::unique_ptr<BatchExecutor>> BatchExecutor::Create(const Options& options) {
  if (options.clock == nullptr) return absl::InvalidArgumentError("BatchExecutor: clock is required");
  if (options.threads_per_batch < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("threads_per_batch must be >= 1, got ", options.threads_per_batch));
  }
  return std::unique_ptr<BatchExecutor>(new BatchExecutor(options));
}

std::vector<std::unique_ptr<InferenceCall>> BatchExecutor::DropExpired(std::vector<CallScheduler::Entry>& batch,
                                                                       absl::Time start) const {
  std::vector<std::unique_ptr<InferenceCall>> runnable;
  runnable.reserve(batch.size());
  for (CallScheduler::Entry& entry : batch) {
    std::unique_ptr<InferenceCall>& call = entry.item;
    // The deadline first: once it passes the transport cancels the call too, and it is the deadline that
    // ended it.
    if (call->deadline <= start) {
      call->finish(absl::DeadlineExceededError(absl::StrCat(
          "deadline passed while queued (waited ", absl::ToInt64Microseconds(start - call->arrival), " us)")));
    } else if (call->is_cancelled && call->is_cancelled()) {
      call->finish(absl::CancelledError("request cancelled while queued"));
    } else {
      runnable.push_back(std::move(call));
    }
  }
  return runnable;
}

void BatchExecutor::Run(const std::string& layer_name, std::vector<CallScheduler::Entry> batch) const {
  const absl::Time start = options_.clock->Now();
  std::vector<std::unique_ptr<InferenceCall>> runnable = DropExpired(batch, start);
  // Nearly always one version; several only right after the layer was replaced.
  std::map<const ServedLayer*, std::vector<std::unique_ptr<InferenceCall>>> by_version;
  for (auto& call : runnable) {
    const ServedLayer* version = call->layer.get();
    by_version[version].push_back(std::move(call));
  }
  for (auto& [version, calls] : by_version) Compute(layer_name, std::move(calls));
}

void BatchExecutor::Compute(const std::string& layer_name,
                            std::vector<std::unique_ptr<InferenceCall>> calls) const {
  ServerMetrics* metrics = options_.metrics;
  const absl::Time compute_start = options_.clock->Now();  // after `start` for a second version's calls
  std::vector<const ParsedAttention*> parsed;
  int64_t tokens = 0;
  double flops = 0;
  for (const auto& call : calls) {
    parsed.push_back(&call->parsed);
    tokens += call->parsed.query_tokens();
    flops += static_cast<double>(call->parsed.flops);
    if (metrics) metrics->QueueWait(layer_name, absl::ToDoubleSeconds(compute_start - call->arrival));
  }
  std::vector<absl::StatusOr<AttentionOutputs>> results =
      calls.front()->layer->engine->ForwardParsed(parsed, options_.threads_per_batch);
  const absl::Duration compute = options_.clock->Now() - compute_start;
  if (metrics) {
    metrics->BatchDone(layer_name, static_cast<int>(calls.size()), tokens, absl::ToDoubleSeconds(compute), flops);
  }
  for (size_t i = 0; i < calls.size(); ++i) {
    InferenceCall& call = *calls[i];
    if (!results[i].ok()) {
      call.finish(results[i].status());
      continue;
    }
    call.outputs = std::move(*results[i]);
    call.timing.queue_us = absl::ToInt64Microseconds(compute_start - call.arrival);
    call.timing.compute_us = absl::ToInt64Microseconds(compute);
    call.timing.batch_size = static_cast<int32_t>(calls.size());
    call.finish(absl::OkStatus());
  }
}

}  // namespace attnserve
