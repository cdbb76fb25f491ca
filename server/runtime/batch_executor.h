// The compute stage: runs one closed batch of a layer through the engine and answers every call in it.
// Calls cancelled or past their deadline while queued are answered without compute. Calls of one batch
// may hold different versions of their layer (it was replaced while they waited): each version computes
// its own calls.
//
// Thread-safety: Run may be called from several worker threads at once.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/batching/clock.h"
#include "server/observability/metrics.h"
#include "server/runtime/cpu_shares.h"
#include "server/runtime/inference_call.h"

namespace attnserve {

class BatchExecutor {
 public:
  // Session appends of at most this many tokens are decode steps: computed and answered first in a batch.
  static constexpr int64_t kDecodeStepTokens = 4;

  struct Options {
    ServerMetrics* metrics = nullptr;  // not owned, may be null
    const Clock* clock = RealClock();  // not owned, required
    // OpenMP threads one batch may use at most, >= 1.
    int threads_per_batch = 1;
    // Not owned, may be null. When set, each batch takes its share of the CPUs while it computes and uses
    // min(threads_per_batch, share) threads (cpu_shares.h).
    CpuShares* shares = nullptr;
    // May be empty. Called on the thread that called Run, once all that is left of the batch is handing over
    // its last answers, at most one per thread (CallScheduler::ThisWorkerLooksForWorkSoon: the worker will look
    // for work right after). Not called when no call of the batch is computed (all expired or cancelled).
    std::function<void()> before_last_answer = nullptr;
  };
  // InvalidArgument for a null clock or threads_per_batch < 1.
  static absl::StatusOr<std::unique_ptr<BatchExecutor>> Create(const Options& options);

  // The scheduler's run_batch: `layer_name` is the queue the batch came from.
  void Run(const std::string& layer_name, std::vector<CallScheduler::Entry> batch) const;

 private:
  explicit BatchExecutor(const Options& options) : options_(options) {}
  // Answers the calls that must not be computed; returns the others, in batch order.
  std::vector<std::unique_ptr<InferenceCall>> DropExpired(std::vector<CallScheduler::Entry>& batch,
                                                          absl::Time start) const;
  // Computes calls that share one layer version on `threads` OpenMP threads and answers them; the batch's
  // `last_group` calls before_last_answer before its last answer.
  void Compute(const std::string& layer_name, std::vector<std::unique_ptr<InferenceCall>> calls, int threads,
               bool last_group) const;
  // Hands `call` its result (timing: its batch's; the queue time is the call's own).
  static void Answer(InferenceCall& call, absl::StatusOr<AttentionOutputs> result, const CallTiming& timing,
                     absl::Time compute_start);
  // RunEngine, and what escapes it (an allocation around the engine calls) failing every call of the group:
  // a worker never dies of a batch.
  std::vector<absl::StatusOr<AttentionOutputs>> RunEngineNoThrow(
      const std::vector<std::unique_ptr<InferenceCall>>& calls, int threads) const;
  // The engine on `calls` (one version), exceptions turned into statuses; failed calls run again alone.
  // Sessions' appends go through ForwardAppends, the stateless calls through ForwardParsed (RunStateless,
  // which fills their places in `results`).
  std::vector<absl::StatusOr<AttentionOutputs>> RunEngine(const std::vector<std::unique_ptr<InferenceCall>>& calls,
                                                          int threads) const;
  std::vector<absl::StatusOr<AttentionOutputs>> RunStateless(
      const std::vector<std::unique_ptr<InferenceCall>>& calls, std::vector<absl::StatusOr<AttentionOutputs>> results,
      int threads) const;

  const Options options_;
};

}  // namespace attnserve
