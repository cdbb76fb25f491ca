// Runs batches from several named queues (one per model layer) on a fixed pool of worker threads.
//
// Each queue follows its own BatchingOptions (server/batching/batch_queue.h). An idle worker takes the next Ready batch
// among all queues, picking the queue whose oldest entry is the oldest (so no layer starves), and calls
// run_batch with it outside the lock. An optional express lane (Options::long_item_cost) runs short
// entries on one more thread while every worker is busy and one of them runs a long batch. With nothing ready it sleeps
// on a condition variable until a Schedule, a Shutdown, or the earliest time a queue becomes ready through its delay
// (converted from the injected clock to a real deadline: absl::Now() + (next_ready - clock->Now())).
//
// Guarantee: nothing accepted is dropped. Every item for which Schedule returned OK reaches run_batch
// exactly once, including the items still queued when Shutdown begins or when their queue is removed (they
// run as forced batches, without waiting for the delay). Items are moved, never copied.
//
// Queues can be added, changed and removed while batches run (layers loaded and unloaded at runtime).
//
// Thread-safety: every public method may be called from any thread at once, except that Shutdown, RemoveQueue
// (and the destructor) must not be called from inside run_batch (they wait for the workers, one of which is
// the caller). run_batch runs on the worker threads, up to worker_threads calls at once (and
// run_express_batch on the express worker), possibly for the same queue; it may call Schedule (e.g. to feed the next
// layer; UNAVAILABLE once Shutdown began), and ThisWorkerLooksForWorkSoon once only its last answer is left to
// hand over.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/thread_name.h"
#include "server/batching/batch_queue.h"
#include "server/batching/clock.h"
#include "server/batching/idle_workers.h"

namespace attnserve {

// What a scheduler reports about itself (to metrics). Called with the scheduler's lock held, so the values
// arrive in order: implementations must be quick and must not call back into the scheduler.
class SchedulerObserver {
 public:
  virtual ~SchedulerObserver() = default;
  // After every change of a queue's waiting entries (push, batch taken, queue removed: 0).
  virtual void QueueDepthChanged(const std::string& queue, size_t depth) = 0;
  // After every change of the number of batches being run.
  virtual void InflightBatchesChanged(int64_t batches) = 0;
};

template <typename T>
class BatchScheduler {
 public:
  using Entry = typename BatchQueue<T>::Entry;

  struct Options {
    int32_t worker_threads = 1;         // threads running batches, >= 1
    const Clock* clock = RealClock();   // not owned; must outlive the scheduler
    // An idle worker polls for new work this long before it sleeps on the condition variable: waking a
    // sleeping thread costs tens of microseconds, a large share of a small request's latency. 0 = never.
    int64_t idle_spin_us = 0;
    SchedulerObserver* observer = nullptr;  // not owned, may be null; must outlive the scheduler
    // Called on a worker thread (without the scheduler's lock) once it has run out of work, before it
    // sleeps: e.g. to give the thread's large scratch buffers back. May be empty.
    std::function<void()> on_idle;
    // on_idle runs once the worker has found no work for this long: a closed loop of clients leaves the
    // queues empty for a moment between batches, and scratch given back then is faulted in again by the
    // next batch (page faults and zeroing were 10% of the served cycles, BENCHMARKS.md). 0: at once.
    int64_t idle_release_delay_us = 0;
    // The express lane, a fair share for short work: with `long_item_cost` > 0, one more thread (the express
    // worker) runs single entries that cost less than long_item_cost, oldest first and without waiting for
    // their queue's delay, through `run_express_batch`, while every worker is busy and one of them runs a
    // batch holding an entry that costs long_item_cost or more. So a request that costs little never waits
    // behind one that costs a lot (seconds of another layer's work), for the price of one more thread on the
    // CPUs meanwhile; batches of many short entries never open the lane. `cost` gives an item's cost (e.g. its
    // FLOPs). 0 = no express lane.
    double long_item_cost = 0;
    std::function<double(const T& item)> cost;
  };

  // Called with a non-empty batch, in the queue's FIFO order, and the name of the queue it came from.
  using BatchFn = std::function<void(const std::string& queue_name, std::vector<Entry> batch)>;

  // Starts the workers. InvalidArgument when worker_threads < 1, clock is null or run_batch is empty.
  // `run_express_batch` is the express lane's (see Options::long_item_cost), called with batches of one.
  static absl::StatusOr<std::unique_ptr<BatchScheduler>> Create(const Options& options, BatchFn run_batch,
                                                                BatchFn run_express_batch = nullptr) {
    if (options.worker_threads < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("worker_threads must be >= 1, got ", options.worker_threads));
    }
    if (options.clock == nullptr) return absl::InvalidArgumentError("clock must not be null");
    if (options.idle_release_delay_us < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("idle_release_delay_us must be >= 0, got ", options.idle_release_delay_us));
    }
    if (!run_batch) return absl::InvalidArgumentError("run_batch must not be empty");
    if (options.long_item_cost < 0 || (options.long_item_cost > 0 && (!options.cost || !run_express_batch))) {
      return absl::InvalidArgumentError("long_item_cost must be >= 0; > 0 needs cost and run_express_batch");
    }
    std::unique_ptr<BatchScheduler> scheduler(
        new BatchScheduler(options, std::move(run_batch), std::move(run_express_batch)));
    scheduler->StartWorkers();
    return scheduler;
  }

  BatchScheduler(const BatchScheduler&) = delete;
  BatchScheduler& operator=(const BatchScheduler&) = delete;

  // Shutdown(): runs everything still queued before returning.
  ~BatchScheduler() { Shutdown(); }

  // Adds an empty queue, at any time (also while batches run). InvalidArgument for an empty name or invalid
  // options (the message names the layer and the field); AlreadyExists for a name already added.
  absl::Status AddQueue(const std::string& name, const BatchingOptions& options) ABSL_LOCKS_EXCLUDED(mu_) {
    if (name.empty()) return absl::InvalidArgumentError("layer name must not be empty");
    if (absl::Status s = options.Validate(); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("layer '", name, "': ", s.message()));
    }
    absl::MutexLock lock(&mu_);
    if (queues_.count(name) > 0) {
      return absl::AlreadyExistsError(absl::StrCat("layer '", name, "' already has a queue"));
    }
    queues_.emplace(name, std::make_shared<QueueState>(name, options, clock_));
    return absl::OkStatus();
  }

  // Changes a queue's options; they apply to the next batch (entries already waiting stay, even past a
  // smaller max_queue_size). Errors as AddQueue's, NOT_FOUND for an unknown queue.
  absl::Status UpdateQueue(const std::string& name, const BatchingOptions& options) ABSL_LOCKS_EXCLUDED(mu_) {
    if (absl::Status s = options.Validate(); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("layer '", name, "': ", s.message()));
    }
    absl::MutexLock lock(&mu_);
    auto it = queues_.find(name);
    if (it == queues_.end() || it->second->removing) return NoQueue(name);
    it->second->queue.SetOptions(options);
    NotifyOne();  // a smaller batch or delay may make it ready now
    return absl::OkStatus();
  }

  // Removes a queue: Schedule refuses it at once (NOT_FOUND), what it holds still runs (forced batches),
  // and RemoveQueue returns once its last batch has returned from run_batch. NOT_FOUND for an unknown
  // queue. A queue of the same name may be added again meanwhile only after this returns.
  absl::Status RemoveQueue(const std::string& name) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    auto it = queues_.find(name);
    if (it == queues_.end() || it->second->removing) return NoQueue(name);
    std::shared_ptr<QueueState> state = it->second;
    state->removing = true;
    NotifyAll();
    auto drained = [&state]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return state->queue.empty() && state->running == 0;
    };
    mu_.Await(absl::Condition(&drained));
    queues_.erase(name);
    if (observer_) observer_->QueueDepthChanged(name, 0);
    return absl::OkStatus();
  }

  // Queues `item` (moved from on success) with its token count. On error `item` is left untouched, so the
  // caller can still answer it: UNAVAILABLE ("server is shutting down") once Shutdown began; NOT_FOUND
  // ("no layer named 'x'") for an unknown queue; RESOURCE_EXHAUSTED when the queue is full;
  // INVALID_ARGUMENT when tokens < 0.
  absl::Status Schedule(const std::string& queue, T& item, int64_t tokens) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    if (shutting_down_) return absl::UnavailableError("server is shutting down");
    auto it = queues_.find(queue);
    if (it == queues_.end() || it->second->removing) return NoQueue(queue);
    BatchQueue<T>& q = it->second->queue;
    const bool was_empty = q.empty();
    if (absl::Status s = q.Push(item, tokens); !s.ok()) return s;
    if (observer_) observer_->QueueDepthChanged(queue, q.size());
    if (long_running_ > 0) express_cv_.Signal();
    // Wake a worker only if this push changed what the workers wait for: a batch to run now, or a new
    // earliest deadline (a push behind older entries does not move the queue's). One suffices: it rescans
    // every queue, and hands on to another idle worker if work remains.
    if (was_empty || q.Ready()) {
      NotifyOne();
    } else {
      schedule_epoch_.fetch_add(1, std::memory_order_release);
    }
    return absl::OkStatus();
  }

  // Called by run_batch on the worker thread running it, when all that is left of the batch is handing over its
  // last answers, a few at most (and freeing it): the worker looks for work right after. Until it does, a push wakes no
  // sleeping worker, as if this one polled: that answer's client sends its next request at once, and a woken
  // worker would compute it on another core's caches while this one found nothing. (That happened to ~5% of a
  // lone client's requests with two workers.) A no-op on any other thread (the express worker's, OpenMP's).
  static void ThisWorkerLooksForWorkSoon() {
    BatchScheduler* scheduler = scheduler_of_this_batch_;
    if (scheduler == nullptr || finishing_on_this_worker_) return;
    finishing_on_this_worker_ = true;
    absl::MutexLock lock(&scheduler->mu_);
    ++scheduler->finishing_workers_;
  }

  // Entries waiting in `queue` (not counting batches being run); 0 for an unknown queue.
  size_t QueueDepth(const std::string& queue) const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    auto it = queues_.find(queue);
    return it == queues_.end() ? 0 : it->second->queue.size();
  }

  // Sleeping workers woken so far (by a Schedule, a queue change or a worker leaving work behind).
  int64_t WorkersWoken() const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return idle_.woken();
  }

  // Workers polling their queues after a batch (idle_spin_us), before they sleep.
  int32_t PollingWorkers() const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return spinning_workers_;
  }

  // Batches taken from their queue whose run_batch has not returned yet.
  int64_t InflightBatches() const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return inflight_batches_;
  }

  // Stops accepting (Schedule -> UNAVAILABLE), runs everything already queued (forced batches, ignoring
  // the delay; size and token limits still hold), waits for the running batches and joins the workers.
  // Idempotent; a concurrent second call returns once the first is done. Also called by the destructor.
  void Shutdown() ABSL_LOCKS_EXCLUDED(mu_, join_mu_) {
    {
      absl::MutexLock lock(&mu_);
      shutting_down_ = true;
      NotifyAll();
      express_cv_.SignalAll();
    }
    absl::MutexLock lock(&join_mu_);
    for (std::thread& worker : workers_) worker.join();
    workers_.clear();
  }

 private:
  // A queue and what the workers need of it while its batch runs unlocked (the name, and whether it may be
  // erased): held by shared_ptr so that RemoveQueue can erase it from the map while a worker still uses it.
  struct QueueState {
    QueueState(const std::string& queue_name, const BatchingOptions& options, const Clock* clock)
        : name(queue_name), queue(options, clock) {}
    const std::string name;
    BatchQueue<T> queue;
    int64_t running = 0;    // batches of this queue in run_batch
    bool removing = false;  // RemoveQueue began: no Schedule, forced batches until empty
  };
  using QueueMap = std::map<std::string, std::shared_ptr<QueueState>>;

  static absl::Status NoQueue(const std::string& name) {
    return absl::NotFoundError(absl::StrCat("no layer named '", name, "'"));
  }

  BatchScheduler(const Options& options, BatchFn run_batch, BatchFn run_express_batch)
      : worker_threads_(options.worker_threads),
        long_item_cost_(options.long_item_cost),
        cost_(options.cost),
        run_express_batch_(std::move(run_express_batch)),
        idle_spin_us_(options.idle_spin_us),
        clock_(options.clock),
        observer_(options.observer),
        on_idle_(options.on_idle),
        idle_release_delay_(absl::Microseconds(options.idle_release_delay_us)),
        run_batch_(std::move(run_batch)),
        idle_(options.worker_threads) {}

  void StartWorkers() ABSL_LOCKS_EXCLUDED(join_mu_) {
    absl::MutexLock lock(&join_mu_);
    // Named before their first parallel region: their OpenMP teams take the name too.
    for (int32_t i = 0; i < worker_threads_; ++i) {
      workers_.emplace_back([this, i] {
        NameThisThread("attn-batch");
        WorkerLoop(i);
      });
    }
    if (long_item_cost_ > 0) {
      workers_.emplace_back([this] {
        NameThisThread("attn-express");
        ExpressLoop();
      });
    }
  }

  bool HoldsLongItem(const std::vector<Entry>& batch) const {
    return std::any_of(batch.begin(), batch.end(),
                       [this](const Entry& e) { return cost_(e.item) >= long_item_cost_; });
  }

  // The queue whose oldest entry is the oldest among those that cost less than long_item_cost; null if
  // none, or while the express lane is closed (a worker is free, or none runs a long batch).
  QueueState* PickExpress() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // A worker finishing its batch takes the work itself in a moment.
    if (long_running_ == 0 || regular_running_ - finishing_workers_ < worker_threads_) return nullptr;
    QueueState* best = nullptr;
    for (auto& [name, state] : queues_) {
      const Entry* front = state->queue.Front();
      if (front == nullptr || cost_(front->item) >= long_item_cost_) continue;
      if (best == nullptr || front->enqueued < best->queue.Front()->enqueued) best = state.get();
    }
    return best;
  }

  // The express worker: single short entries while the workers are all busy and one runs a long batch.
  // Waits on its own condition variable (no deadline: it ignores queue delays), so it never takes a
  // worker's wake-up.
  void ExpressLoop() ABSL_LOCKS_EXCLUDED(mu_) {
    mu_.Lock();
    while (!shutting_down_) {  // once shutting down the workers run what is left
      QueueState* state = PickExpress();
      if (state == nullptr) {
        express_cv_.Wait(&mu_);
        continue;
      }
      RunOneBatch(state, /*express=*/true);
    }
    mu_.Unlock();
  }

  // The non-empty queue to take a batch from now (every non-empty queue qualifies once shutting down or
  // being removed, otherwise only the Ready ones), the one whose oldest entry is the oldest; null if none.
  // Sets *next_ready to the earliest time a queue that is not ready becomes ready through its delay.
  QueueState* PickQueue(absl::Time* next_ready) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    *next_ready = absl::InfiniteFuture();
    QueueState* best = nullptr;
    for (auto& [name, state] : queues_) {
      const BatchQueue<T>& q = state->queue;
      if (q.empty()) continue;
      if (shutting_down_ || state->removing || q.Ready()) {
        if (best == nullptr || q.OldestEnqueued() < best->queue.OldestEnqueued()) best = state.get();
      } else {
        *next_ready = std::min(*next_ready, q.NextReadyTime());
      }
    }
    return best;
  }

  bool AnyQueued() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return std::any_of(queues_.begin(), queues_.end(), [](const auto& q) { return !q.second->queue.empty(); });
  }

  // Takes a batch from `state` (the express lane: its oldest entry alone) and runs it with mu_ released.
  void RunOneBatch(QueueState* state, bool express = false) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<Entry> batch =
        express ? state->queue.TakeFront() : state->queue.TakeBatch(/*force=*/shutting_down_ || state->removing);
    const bool long_batch = !express && long_item_cost_ > 0 && HoldsLongItem(batch);
    ++inflight_batches_;
    ++state->running;
    regular_running_ += express ? 0 : 1;
    long_running_ += long_batch ? 1 : 0;
    if (long_batch || (long_running_ > 0 && !state->queue.empty())) express_cv_.Signal();
    if (observer_) {
      observer_->QueueDepthChanged(state->name, state->queue.size());
      observer_->InflightBatchesChanged(inflight_batches_);
    }
    // Whoever was signalled for the rest of the work may be this worker: pass it on so that another idle
    // worker runs it, or at least sleeps with the right deadline.
    if (AnyQueued()) NotifyOne();
    const std::shared_ptr<QueueState> keep = queues_.at(state->name);  // RemoveQueue may erase it meanwhile
    mu_.Unlock();
    scheduler_of_this_batch_ = express ? nullptr : this;
    (express ? run_express_batch_ : run_batch_)(keep->name, std::move(batch));
    scheduler_of_this_batch_ = nullptr;
    mu_.Lock();
    if (finishing_on_this_worker_) {
      finishing_on_this_worker_ = false;
      --finishing_workers_;
    }
    --inflight_batches_;
    --keep->running;
    regular_running_ -= express ? 0 : 1;
    long_running_ -= long_batch ? 1 : 0;
    if (observer_) observer_->InflightBatchesChanged(inflight_batches_);
  }

  // Polls (without the lock) for a Schedule for idle_spin_us before the worker pays for a sleep and a
  // wake-up.
  void IdleSpin() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const uint64_t epoch = schedule_epoch_.load(std::memory_order_acquire);
    ++spinning_workers_;
    mu_.Unlock();
    const absl::Time until = absl::Now() + absl::Microseconds(idle_spin_us_);
    while (schedule_epoch_.load(std::memory_order_acquire) == epoch && absl::Now() < until) {
      __builtin_ia32_pause();
    }
    mu_.Lock();
    --spinning_workers_;
  }

  // Tells one idle worker that there may be work: a polling one sees the epoch move and rescans; only if none
  // polls, and none is about to (ThisWorkerLooksForWorkSoon), is a sleeping one woken (a woken one would only
  // start polling too, on a CPU the work's answer needs).
  void NotifyOne() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    schedule_epoch_.fetch_add(1, std::memory_order_release);
    if (spinning_workers_ == 0 && finishing_workers_ == 0) idle_.WakeOne();
  }
  void NotifyAll() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    schedule_epoch_.fetch_add(1, std::memory_order_release);
    idle_.WakeAll();
  }

  // Waits until `deadline` (of clock_) or a wake-up.
  void Sleep(int worker, absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    clock_->WaitUntil(&mu_, idle_.Sleeping(worker), deadline);
    idle_.Awake(worker);
  }

  void WorkerLoop(int worker) ABSL_LOCKS_EXCLUDED(mu_) {
    bool spun = false;  // whether this worker already polled since it last found work
    bool idled = true;  // whether on_idle ran since it last found work
    absl::Time idle_since = absl::InfiniteFuture();  // when it last found no work at all
    mu_.Lock();
    while (true) {
      absl::Time next_ready;
      if (QueueState* state = PickQueue(&next_ready)) {
        spun = false;
        idled = false;
        idle_since = absl::InfiniteFuture();
        RunOneBatch(state);
        continue;
      }
      // Once shutting down every non-empty queue qualifies and no new item is accepted: nothing is left.
      if (shutting_down_) break;
      if (next_ready == absl::InfiniteFuture() && idle_spin_us_ > 0 && !spun) {
        IdleSpin();
        spun = true;
        continue;
      }
      if (next_ready == absl::InfiniteFuture() && !idled && on_idle_) {
        if (idle_since == absl::InfiniteFuture()) idle_since = clock_->Now();
        if (clock_->Now() < idle_since + idle_release_delay_) {
          Sleep(worker, idle_since + idle_release_delay_);
          continue;  // work may have come meanwhile
        }
        mu_.Unlock();
        on_idle_();
        mu_.Lock();
        idled = true;
        continue;  // work may have come meanwhile
      }
      spun = false;
      Sleep(worker, next_ready);
    }
    mu_.Unlock();
  }

  const int32_t worker_threads_;
  const double long_item_cost_;
  const std::function<double(const T&)> cost_;
  const BatchFn run_express_batch_;
  const int64_t idle_spin_us_;
  std::atomic<uint64_t> schedule_epoch_{0};  // bumped by every Schedule and Notify; polled by idle workers
  int32_t spinning_workers_ ABSL_GUARDED_BY(mu_) = 0;  // in IdleSpin: each rescans the queues when it ends
  // Past ThisWorkerLooksForWorkSoon in their batch: each rescans the queues when run_batch returns.
  int32_t finishing_workers_ ABSL_GUARDED_BY(mu_) = 0;
  // On a worker's thread while it runs a batch (not on the express worker's): the scheduler, and whether the
  // batch called ThisWorkerLooksForWorkSoon.
  static inline thread_local BatchScheduler* scheduler_of_this_batch_ = nullptr;
  static inline thread_local bool finishing_on_this_worker_ = false;
  const Clock* const clock_;
  SchedulerObserver* const observer_;
  const std::function<void()> on_idle_;
  const absl::Duration idle_release_delay_;
  const BatchFn run_batch_;  // called concurrently by the workers

  mutable absl::Mutex mu_;
  // The workers asleep; one is woken on Schedule, queue changes and by a worker leaving work behind (unless a
  // worker polls or finishes its batch), all on Shutdown and RemoveQueue.
  IdleWorkers idle_ ABSL_GUARDED_BY(mu_);
  QueueMap queues_ ABSL_GUARDED_BY(mu_);
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  int64_t inflight_batches_ ABSL_GUARDED_BY(mu_) = 0;
  int32_t regular_running_ ABSL_GUARDED_BY(mu_) = 0;  // batches the workers (not the express lane) run
  int32_t long_running_ ABSL_GUARDED_BY(mu_) = 0;     // of those, the ones holding a long item
  absl::CondVar express_cv_;  // the express worker's: a long batch started, or a Schedule while one runs

  // Separate from mu_ so that concurrent Shutdown calls join each worker once, without holding mu_.
  absl::Mutex join_mu_;
  std::vector<std::thread> workers_ ABSL_GUARDED_BY(join_mu_);
};

}  // namespace attnserve
