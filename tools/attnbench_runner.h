// attnbench's two ways of loading a server, over any RequestSender:
// - closed loop: `concurrency` workers, each with one request in flight, sending the next when the last one
//   is answered; latency runs from send to answer. A worker is a thread, or, for senders that never block,
//   a chain of answer callbacks (no thread to wake per request: the load generator's CPU is the server's
//   loss on a shared machine).
// - open loop: requests at fixed intended times, 1/rate apart, whether or not earlier ones were answered;
//   latency runs from the intended send time to the answer, so a stall (of the server, or of the sender
//   itself) counts against every request it delayed rather than hiding in fewer, later sends.
// Requests sent (intended) during the warmup are answered but not recorded. After the duration no new
// request starts, and the runner waits for every outstanding answer.
//
// Thread-safety: one run at a time per sender; the recorder is shared with the progress reporter.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tools/attnbench_stats.h"

namespace attnserve {

using BenchTime = std::chrono::steady_clock::time_point;

// Time for the runners; tests substitute a fake one that only moves when told.
class BenchClock {
 public:
  virtual ~BenchClock() = default;
  virtual BenchTime Now() const = 0;
  // Returns at once when `t` has passed.
  virtual void SleepUntil(BenchTime t) = 0;
};
BenchClock* RealBenchClock();

// Sends one request asynchronously. `done` runs exactly once, on any thread (possibly within Send, and
// possibly after a delay inside Send), with how the request ended. `lane` groups a worker's requests (the
// closed loop passes the worker's index, the open loop the request's number): a sender with several
// streams keeps one lane on one stream.
class RequestSender {
 public:
  virtual ~RequestSender() = default;
  virtual void Send(uint64_t seq, uint64_t lane, std::function<void(const Outcome&)> done) = 0;
  // True when Send returns without waiting on anything (an async call started): the closed loop may then
  // send a worker's next request from the previous answer's callback instead of from a thread of its own.
  virtual bool SendNeverBlocks() const { return false; }
};

struct ClosedLoopOptions {
  int64_t concurrency = 1;                      // workers, each with one request in flight
  absl::Duration warmup = absl::ZeroDuration();  // sent before warmup's end: not recorded
  absl::Duration duration = absl::Seconds(10);   // measured time after the warmup
};

struct OpenLoopOptions {
  double rate_per_second = 100;                  // intended sends per second, evenly spaced
  absl::Duration warmup = absl::ZeroDuration();
  absl::Duration duration = absl::Seconds(10);
};

// How long the measured part took: from the warmup's end to the last recorded answer (at least the
// duration, so requests per second are not inflated by a short tail).
struct LoopResult {
  double elapsed_seconds = 0;
  int64_t sent = 0;  // every request started, warmup included
};

// InvalidArgument for options out of range (concurrency < 1, rate <= 0, negative durations).
absl::StatusOr<LoopResult> RunClosedLoop(RequestSender* sender, BenchClock* clock, const ClosedLoopOptions& options,
                                         StepRecorder* recorder);
absl::StatusOr<LoopResult> RunOpenLoop(RequestSender* sender, BenchClock* clock, const OpenLoopOptions& options,
                                       StepRecorder* recorder);

}  // namespace attnserve
