#include "server/runtime/batch_executor.h"

#include <algorithm>
#include <functional>
#include <map>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"

namespace attnserve {
namespace {

// One engine call that cannot throw: what escapes the engine fails every request of the call.
std::vector<absl::StatusOr<AttentionOutputs>> ForwardNoThrow(const MultiheadAttention& engine,
                                                             absl::Span<const ParsedAttention* const> parsed,
                                                             int threads, const StopFn& stop) {
  try {
    return engine.ForwardParsed(parsed, threads, stop);
  } catch (const std::bad_alloc&) {
    return std::vector<absl::StatusOr<AttentionOutputs>>(
        parsed.size(), absl::ResourceExhaustedError("out of memory while computing the batch"));
  } catch (const std::exception& e) {
    return std::vector<absl::StatusOr<AttentionOutputs>>(
        parsed.size(), absl::InternalError(absl::StrCat("engine failure: ", e.what())));
  }
}

// Why a call must stop computing, if it must: its deadline passed or its client cancelled it.
absl::Status StopReason(const InferenceCall& call, const Clock& clock) {
  if (call.deadline != absl::InfiniteFuture() && clock.Now() >= call.deadline) {
    return absl::DeadlineExceededError("deadline passed while computing");
  }
  if (call.is_cancelled && call.is_cancelled()) return absl::CancelledError("request cancelled while computing");
  return absl::OkStatus();
}

bool IsStop(const absl::Status& s) {
  return s.code() == absl::StatusCode::kCancelled || s.code() == absl::StatusCode::kDeadlineExceeded;
}

// Sessions' appends of one batch as one engine call (each has its own cache; nothing to rerun alone: an
// append's error is its own).
std::vector<absl::StatusOr<AttentionOutputs>> AppendsNoThrow(const AppendEngine& engine,
                                                             const std::vector<const CachedAppend*>& appends,
                                                             int threads) {
  try {
    return engine.ForwardAppends(appends, threads);
  } catch (const std::bad_alloc&) {
    return std::vector<absl::StatusOr<AttentionOutputs>>(
        appends.size(), absl::ResourceExhaustedError("out of memory while computing the batch"));
  } catch (const std::exception& e) {
    return std::vector<absl::StatusOr<AttentionOutputs>>(
        appends.size(), absl::InternalError(absl::StrCat("engine failure: ", e.what())));
  }
}

// A decoder layer's requests as one ragged batch, each stopped between its query blocks once its deadline
// passed or its client left.
std::vector<absl::StatusOr<AttentionOutputs>> DecoderNoThrow(const std::vector<const InferenceCall*>& calls,
                                                             int threads, const Clock& clock) {
  std::vector<const ParsedDecoder*> parsed;
  for (const InferenceCall* call : calls) parsed.push_back(&call->decoder_parsed);
  const StopFn stop = [&](size_t i) { return StopReason(*calls[i], clock); };
  try {
    return calls.front()->layer->decoder->ForwardBatch(parsed, threads, stop);
  } catch (const std::bad_alloc&) {
    return std::vector<absl::StatusOr<AttentionOutputs>>(
        calls.size(), absl::ResourceExhaustedError("out of memory while computing the batch"));
  } catch (const std::exception& e) {
    return std::vector<absl::StatusOr<AttentionOutputs>>(
        calls.size(), absl::InternalError(absl::StrCat("engine failure: ", e.what())));
  }
}

// A group's error fails all its requests: each failed one (not stopped) runs again alone, so that the error stays
// with the request that caused it and the others get their answers.
void RerunFailedAlone(std::vector<absl::StatusOr<AttentionOutputs>>& got,
                      const std::function<absl::StatusOr<AttentionOutputs>(size_t)>& run_alone) {
  for (size_t i = 0; got.size() > 1 && i < got.size(); ++i) {
    if (!got[i].ok() && !IsStop(got[i].status())) got[i] = run_alone(i);
  }
}

}  // namespace

std::vector<absl::StatusOr<AttentionOutputs>> BatchExecutor::RunEngineNoThrow(
    const std::vector<std::unique_ptr<InferenceCall>>& calls, int threads) const {
  // The engine calls catch their own; this is for what is around them (the batch's own vectors).
  absl::Status failed;
  try {
    return RunEngine(calls, threads);
  } catch (const std::bad_alloc&) {
    failed = absl::ResourceExhaustedError("out of memory while computing the batch");
  } catch (const std::exception& e) {
    failed = absl::InternalError(absl::StrCat("batch failure: ", e.what()));
  }
  return std::vector<absl::StatusOr<AttentionOutputs>>(calls.size(), failed);
}

std::vector<absl::StatusOr<AttentionOutputs>> BatchExecutor::RunEngine(
    const std::vector<std::unique_ptr<InferenceCall>>& all, int threads) const {
  std::vector<absl::StatusOr<AttentionOutputs>> results(all.size());
  const AppendEngine& engine = all.front()->layer->appender();
  std::vector<const CachedAppend*> appends;
  std::vector<size_t> append_index;
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i]->session == nullptr) continue;
    appends.push_back(&all[i]->session->append);
    append_index.push_back(i);
  }
  if (!appends.empty()) {
    std::vector<absl::StatusOr<AttentionOutputs>> got =
        AppendsNoThrow(engine, appends, threads);
    for (size_t m = 0; m < got.size(); ++m) results[append_index[m]] = std::move(got[m]);
    if (appends.size() == all.size()) return results;
  }
  return RunStateless(all, std::move(results), threads);
}

std::vector<absl::StatusOr<AttentionOutputs>> BatchExecutor::RunStateless(
    const std::vector<std::unique_ptr<InferenceCall>>& all, std::vector<absl::StatusOr<AttentionOutputs>> results,
    int threads) const {
  std::vector<const InferenceCall*> calls;
  std::vector<size_t> index;
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i]->session != nullptr) continue;
    calls.push_back(all[i].get());
    index.push_back(i);
  }
  const Clock& clock = *options_.clock;
  std::vector<absl::StatusOr<AttentionOutputs>> got;
  if (calls.front()->layer->decoder != nullptr) {
    got = DecoderNoThrow(calls, threads, clock);
    RerunFailedAlone(got, [&](size_t i) { return std::move(DecoderNoThrow({calls[i]}, threads, clock)[0]); });
  } else {
    const MultiheadAttention& engine = *calls.front()->layer->engine;
    std::vector<const ParsedAttention*> parsed;
    for (const InferenceCall* call : calls) parsed.push_back(&call->parsed);
    StopFn stop = [&](size_t i) { return StopReason(*calls[i], clock); };
    got = ForwardNoThrow(engine, parsed, threads, stop);
    RerunFailedAlone(got, [&](size_t i) {
      const ParsedAttention* one[] = {parsed[i]};
      StopFn stop_one = [&](size_t) { return StopReason(*calls[i], clock); };
      return std::move(ForwardNoThrow(engine, one, threads, stop_one)[0]);
    });
  }
  for (size_t i = 0; i < calls.size(); ++i) results[index[i]] = std::move(got[i]);
  return results;
}

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
  if (runnable.empty()) return;
  std::optional<CpuShares::Share> share;
  if (options_.shares != nullptr) share.emplace(options_.shares->Take());
  const int threads = share ? std::min(options_.threads_per_batch, share->threads()) : options_.threads_per_batch;
  // Decode first: sessions' decode steps (a few tokens) are computed and answered before the batch's long
  // members (a prefill chunk, stateless requests), so that they do not wait for them.
  std::vector<std::unique_ptr<InferenceCall>> decode_steps, rest;
  for (auto& call : runnable) {
    const bool decode = call->session != nullptr && call->session->append.tokens <= kDecodeStepTokens;
    (decode ? decode_steps : rest).push_back(std::move(call));
  }
  std::vector<std::vector<std::unique_ptr<InferenceCall>>> groups;  // computed in turn
  for (auto* calls : {&decode_steps, &rest}) {
    // Nearly always one version; several only right after the layer was replaced.
    std::map<const ServedLayer*, std::vector<std::unique_ptr<InferenceCall>>> by_version;
    for (auto& call : *calls) {
      const ServedLayer* version = call->layer.get();
      by_version[version].push_back(std::move(call));
    }
    for (auto& [version, same] : by_version) groups.push_back(std::move(same));
  }
  for (size_t g = 0; g < groups.size(); ++g) {
    Compute(layer_name, std::move(groups[g]), threads, /*last_group=*/g + 1 == groups.size());
  }
}

void BatchExecutor::Compute(const std::string& layer_name, std::vector<std::unique_ptr<InferenceCall>> calls,
                            int threads, bool last_group) const {
  ServerMetrics* metrics = options_.metrics;
  const absl::Time compute_start = options_.clock->Now();  // after `start` for a second version's calls
  int64_t tokens = 0;
  double flops = 0;
  for (const auto& call : calls) {
    tokens += call->parsed.query_tokens();
    flops += static_cast<double>(call->parsed.flops);
    if (metrics) metrics->QueueWait(layer_name, absl::ToDoubleSeconds(compute_start - call->arrival));
  }
  std::vector<absl::StatusOr<AttentionOutputs>> results = RunEngineNoThrow(calls, threads);
  const absl::Duration compute = options_.clock->Now() - compute_start;
  if (metrics) {
    metrics->BatchDone(layer_name, static_cast<int>(calls.size()), tokens, absl::ToDoubleSeconds(compute), flops);
    metrics->statistics().BatchDone(layer_name, calls.front()->layer->version, static_cast<int>(calls.size()),
                                    compute);
  }
  CallTiming timing;  // queue_us is each call's own
  timing.compute_us = absl::ToInt64Microseconds(compute);
  timing.batch_size = static_cast<int32_t>(calls.size());
  // Answering (encoding each answer, handing it to the transport) is serial work per call: spread over the batch's
  // threads, rather than leaving all but one of its cores idle until the next batch. before_last_answer comes
  // once the answers left are one per thread: before all of them if there are no more, else before the last
  // one, which goes out on this thread.
  const bool hook = last_group && options_.before_last_answer;
  const int64_t all = static_cast<int64_t>(calls.size());
  const bool hook_first = hook && all <= threads;
  if (hook_first) options_.before_last_answer();
  const int64_t n = hook && !hook_first ? all - 1 : all;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (n > 1)
  for (int64_t i = 0; i < n; ++i) Answer(*calls[i], std::move(results[i]), timing, compute_start);
  if (n < all) {
    options_.before_last_answer();
    Answer(*calls.back(), std::move(results.back()), timing, compute_start);
  }
}

void BatchExecutor::Answer(InferenceCall& call, absl::StatusOr<AttentionOutputs> result, const CallTiming& timing,
                           absl::Time compute_start) {
  if (!result.ok()) {
    call.finish(result.status());
    return;
  }
  call.outputs = std::move(*result);
  call.timing.queue_us = absl::ToInt64Microseconds(compute_start - call.arrival);
  call.timing.compute_us = timing.compute_us;
  call.timing.batch_size = timing.batch_size;
  call.finish(absl::OkStatus());
}

}  // namespace attnserve
