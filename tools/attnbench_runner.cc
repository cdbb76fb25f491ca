#include "tools/attnbench_runner.h"

#include <algorithm>
#include <cmath>
#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

namespace attnserve {
namespace {

class RealClock final : public BenchClock {
 public:
  BenchTime Now() const override { return std::chrono::steady_clock::now(); }
  void SleepUntil(BenchTime t) override { std::this_thread::sleep_until(t); }
};

std::chrono::nanoseconds ToChrono(absl::Duration d) { return absl::ToChronoNanoseconds(d); }

int64_t Nanos(BenchTime from, BenchTime to) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(to - from).count();
}

absl::Status CheckDurations(absl::Duration warmup, absl::Duration duration) {
  if (warmup < absl::ZeroDuration() || duration < absl::ZeroDuration() || warmup == absl::InfiniteDuration() ||
      duration == absl::InfiniteDuration()) {
    return absl::InvalidArgumentError("warmup and duration must be finite and non-negative");
  }
  return absl::OkStatus();
}

// The latest answer recorded, shared by the threads that record.
class LastAnswer {
 public:
  explicit LastAnswer(BenchTime floor) : last_(floor) {}
  void Update(BenchTime t) {
    absl::MutexLock lock(&mu_);
    last_ = std::max(last_, t);
  }
  BenchTime Get() const {
    absl::MutexLock lock(&mu_);
    return last_;
  }

 private:
  mutable absl::Mutex mu_;
  BenchTime last_;
};

LoopResult MakeLoopResult(BenchTime last_answer, BenchTime measure_start, int64_t sent) {
  return LoopResult{std::chrono::duration<double>(last_answer - measure_start).count(), sent};
}

// The closed loop's workers as callback chains: each answer is recorded and the worker's next request sent
// from the answer's callback. An answer that arrives within Send (the callback ran inline) is left for the
// sending loop to follow up, so the chain never recurses.
class ChainedWorkers {
 public:
  struct Run {
    RequestSender* sender;
    BenchClock* clock;
    BenchTime measure_start, end;
    StepRecorder* recorder;
    LastAnswer* last;
    std::atomic<uint64_t>* seq;
  };
  ChainedWorkers(const Run& run, int64_t workers) : run_(run), lanes_(static_cast<size_t>(workers)), done_(workers) {}

  void RunToEnd() {
    for (size_t i = 0; i < lanes_.size(); ++i) {
      lanes_[i].index = i;
      Next(lanes_[i]);
    }
    done_.Wait();
  }

 private:
  struct Lane {
    uint64_t index = 0;
    BenchTime sent;
    std::atomic<bool> in_send{false};  // Send is running; cleared by whichever of Send and the answer ends last
  };

  void Next(Lane& lane) {
    while (true) {
      lane.sent = run_.clock->Now();
      if (lane.sent >= run_.end) {
        done_.DecrementCount();  // the last use of `this` by this lane
        return;
      }
      lane.in_send.store(true);
      run_.sender->Send(run_.seq->fetch_add(1), lane.index, [this, &lane](const Outcome& o) { Answered(lane, o); });
      if (lane.in_send.exchange(false)) return;  // not answered yet: the answer sends the next one
    }
  }

  void Answered(Lane& lane, const Outcome& outcome) {
    const BenchTime answered = run_.clock->Now();
    if (lane.sent >= run_.measure_start) {
      run_.recorder->Record(Nanos(lane.sent, answered), outcome);
      run_.last->Update(answered);
    }
    if (lane.in_send.exchange(false)) return;  // answered within Send: its loop sends the next one
    Next(lane);
  }

  const Run run_;
  std::vector<Lane> lanes_;
  absl::BlockingCounter done_;
};

}  // namespace

BenchClock* RealBenchClock() {
  static auto* clock = new RealClock();
  return clock;
}

absl::StatusOr<LoopResult> RunClosedLoop(RequestSender* sender, BenchClock* clock, const ClosedLoopOptions& options,
                                         StepRecorder* recorder) {
  if (options.concurrency < 1) {
    return absl::InvalidArgumentError(absl::StrCat("concurrency must be >= 1, got ", options.concurrency));
  }
  if (absl::Status s = CheckDurations(options.warmup, options.duration); !s.ok()) return s;
  const BenchTime measure_start = clock->Now() + ToChrono(options.warmup);
  const BenchTime end = measure_start + ToChrono(options.duration);
  std::atomic<uint64_t> seq{0};
  LastAnswer last(end);
  if (sender->SendNeverBlocks()) {
    ChainedWorkers({sender, clock, measure_start, end, recorder, &last, &seq}, options.concurrency).RunToEnd();
    return MakeLoopResult(last.Get(), measure_start, static_cast<int64_t>(seq.load()));
  }

  // A thread per worker: each waits for its own answer, so at most `concurrency` requests are in flight.
  auto worker = [&](uint64_t lane) {
    while (true) {
      const BenchTime sent = clock->Now();
      if (sent >= end) return;
      Outcome outcome;
      BenchTime answered;
      absl::Notification done;
      sender->Send(seq.fetch_add(1), lane, [&](const Outcome& o) {
        answered = clock->Now();  // taken here, not after the wake-up, which may lag on a busy machine
        outcome = o;
        done.Notify();
      });
      done.WaitForNotification();
      if (sent >= measure_start) {
        recorder->Record(Nanos(sent, answered), outcome);
        last.Update(answered);
      }
    }
  };
  std::vector<std::thread> threads;
  for (int64_t w = 1; w < options.concurrency; ++w) threads.emplace_back(worker, static_cast<uint64_t>(w));
  worker(0);
  for (std::thread& t : threads) t.join();
  return MakeLoopResult(last.Get(), measure_start, static_cast<int64_t>(seq.load()));
}

absl::StatusOr<LoopResult> RunOpenLoop(RequestSender* sender, BenchClock* clock, const OpenLoopOptions& options,
                                       StepRecorder* recorder) {
  if (!(options.rate_per_second > 0) || !std::isfinite(options.rate_per_second)) {
    return absl::InvalidArgumentError(absl::StrCat("rate must be > 0, got ", options.rate_per_second));
  }
  if (absl::Status s = CheckDurations(options.warmup, options.duration); !s.ok()) return s;
  const BenchTime start = clock->Now();
  const BenchTime measure_start = start + ToChrono(options.warmup);
  const BenchTime end = measure_start + ToChrono(options.duration);

  // Shared with the callbacks, which may outlive this frame by the moment between their notify and return.
  struct Outstanding {
    absl::Mutex mu;
    int64_t count ABSL_GUARDED_BY(mu) = 0;
  };
  auto outstanding = std::make_shared<Outstanding>();
  auto last = std::make_shared<LastAnswer>(end);
  uint64_t i = 0;
  for (;; ++i) {
    // From the start each time (not by accumulating the interval), so rounding does not drift the rate.
    const BenchTime intended =
        start + std::chrono::duration_cast<std::chrono::nanoseconds>(
                    std::chrono::duration<double>(static_cast<double>(i) / options.rate_per_second));
    if (intended >= end) break;
    clock->SleepUntil(intended);
    {
      absl::MutexLock lock(&outstanding->mu);
      ++outstanding->count;
    }
    const bool measured = intended >= measure_start;
    sender->Send(i, i, [=](const Outcome& outcome) {
      const BenchTime answered = clock->Now();
      if (measured) {
        recorder->Record(Nanos(intended, answered), outcome);
        last->Update(answered);
      }
      absl::MutexLock lock(&outstanding->mu);
      --outstanding->count;
    });
  }
  {
    absl::MutexLock lock(&outstanding->mu);
    outstanding->mu.Await(absl::Condition(
        +[](int64_t* count) { return *count == 0; }, &outstanding->count));
  }
  return MakeLoopResult(last->Get(), measure_start, static_cast<int64_t>(i));
}

}  // namespace attnserve
