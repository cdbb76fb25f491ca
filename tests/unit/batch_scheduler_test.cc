// BatchScheduler: real threads, virtual time. Correctness never depends on timing: tests wait for conditions
// (with long timeouts that only turn a hang into a failure), gate run_batch with notifications, and drive
// the batching delays with a fake clock whose waits the workers sleep in (FakeClock::AwaitWaiters tells
// when every worker is asleep, so a test advances time only then). No test sleeps, except the one that
// checks the real clock's wait.
#include "server/batching/batch_scheduler.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdint>
#include <map>
#include <random>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tests/testing/batching_options.h"
#include "tests/testing/fake_clock.h"

namespace attnserve {
namespace {

struct Request {
  int producer = 0;
  int seq = 0;
};
using Item = std::unique_ptr<Request>;
using Scheduler = BatchScheduler<Item>;
using Entry = Scheduler::Entry;

constexpr absl::Duration kHangTimeout = absl::Seconds(60);  // only turns a hang into a failure

Item MakeItem(int producer, int seq) { return std::make_unique<Request>(Request{producer, seq}); }

using testing::Opts;

// What run_batch saw, thread-safe.
class Recorder {
 public:
  struct Batch {
    std::string queue;
    std::vector<Request> requests;
    int64_t tokens = 0;
  };

  void Record(const std::string& queue, const std::vector<Entry>& batch) {
    Batch b;
    b.queue = queue;
    for (const Entry& e : batch) {
      b.requests.push_back(*e.item);
      b.tokens += e.tokens;
    }
    absl::MutexLock lock(&mu_);
    items_ += static_cast<int64_t>(batch.size());
    batches_.push_back(std::move(b));
  }
  // False on timeout.
  bool WaitForItems(int64_t n) {
    absl::MutexLock lock(&mu_);
    auto reached = [this, n]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return items_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&reached), kHangTimeout);
  }
  int64_t items() const {
    absl::MutexLock lock(&mu_);
    return items_;
  }
  std::vector<Batch> batches() const {
    absl::MutexLock lock(&mu_);
    return batches_;
  }

 private:
  mutable absl::Mutex mu_;
  int64_t items_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<Batch> batches_ ABSL_GUARDED_BY(mu_);
};

TEST(BatchSchedulerTest, CreateValidatesOptions) {
  auto noop = [](const std::string&, std::vector<Entry>) {};
  Scheduler::Options options;
  options.worker_threads = 0;
  auto s = Scheduler::Create(options, noop);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.status().message(), "worker_threads must be >= 1, got 0");
  options.worker_threads = 2;
  EXPECT_EQ(Scheduler::Create(options, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  options.clock = nullptr;
  EXPECT_EQ(Scheduler::Create(options, noop).status().code(), absl::StatusCode::kInvalidArgument);
  options.clock = RealClock();
  EXPECT_TRUE(Scheduler::Create(options, noop).ok());
}

TEST(BatchSchedulerTest, AddQueueErrors) {
  auto scheduler = Scheduler::Create({}, [](const std::string&, std::vector<Entry>) {});
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  EXPECT_TRUE(s.AddQueue("layer0", Opts(8, 0)).ok());
  absl::Status dup = s.AddQueue("layer0", Opts(4, 0));
  EXPECT_EQ(dup.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_NE(dup.message().find("layer0"), absl::string_view::npos) << dup;
  absl::Status bad = s.AddQueue("layer1", Opts(0, 0));
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.message(), "layer 'layer1': max_batch_size must be >= 1, got 0");
  EXPECT_EQ(s.AddQueue("", Opts(8, 0)).code(), absl::StatusCode::kInvalidArgument);
  Item item = MakeItem(0, 0);
  EXPECT_EQ(s.Schedule("layer1", item, 1).code(), absl::StatusCode::kNotFound);  // not added
}

TEST(BatchSchedulerTest, UnknownQueueIsNotFoundAndLeavesTheItem) {
  Recorder rec;
  auto scheduler = Scheduler::Create({}, [&](const std::string& q, std::vector<Entry> b) { rec.Record(q, b); });
  ASSERT_TRUE(scheduler.ok());
  ASSERT_TRUE((*scheduler)->AddQueue("a", Opts(8, 0)).ok());
  Item item = MakeItem(3, 4);
  absl::Status s = (*scheduler)->Schedule("x", item, 1);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(s.message(), "no layer named 'x'");
  ASSERT_NE(item, nullptr);
  EXPECT_EQ(item->seq, 4);
  EXPECT_EQ((*scheduler)->QueueDepth("x"), 0u);
  (*scheduler)->Shutdown();
  EXPECT_EQ(rec.items(), 0);
}

// One worker held inside run_batch by a gate, so the queue behind it fills deterministically.
TEST(BatchSchedulerTest, FullQueueIsResourceExhaustedAndLeavesTheItem) {
  Recorder rec;
  absl::Notification started, gate;
  auto scheduler = Scheduler::Create({}, [&](const std::string& q, std::vector<Entry> b) {
    if (!started.HasBeenNotified()) started.Notify();
    gate.WaitForNotification();
    rec.Record(q, b);
  });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  ASSERT_TRUE(s.AddQueue("a", Opts(/*max_batch_size=*/1, 0, /*max_queue_size=*/2)).ok());
  Item first = MakeItem(0, 0);
  ASSERT_TRUE(s.Schedule("a", first, 1).ok());
  EXPECT_EQ(first, nullptr);
  ASSERT_TRUE(started.WaitForNotificationWithTimeout(kHangTimeout));
  EXPECT_EQ(s.InflightBatches(), 1);
  for (int i = 1; i <= 2; ++i) {
    Item item = MakeItem(0, i);
    ASSERT_TRUE(s.Schedule("a", item, 1).ok());
  }
  EXPECT_EQ(s.QueueDepth("a"), 2u);
  Item extra = MakeItem(0, 3);
  absl::Status st = s.Schedule("a", extra, 1);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(st.message(), "queue full: 2 requests waiting (max_queue_size)");
  ASSERT_NE(extra, nullptr);
  EXPECT_EQ(extra->seq, 3);
  gate.Notify();
  ASSERT_TRUE(rec.WaitForItems(3));
  s.Shutdown();
  EXPECT_EQ(rec.items(), 3);
  EXPECT_EQ(s.InflightBatches(), 0);
}

// Many producers on several queues and workers: every item runs exactly once, in FIFO order within each
// batch, and no batch breaks its queue's limits.
// Every item runs exactly once, within its queue's limits, in FIFO order per producer.
void RunManyProducers(int64_t idle_spin_us) {
  constexpr int kProducers = 8, kItemsPerProducer = 500;
  const std::map<std::string, BatchingOptions> queues = {
      {"layer0", Opts(8, 0, 4096)},
      {"layer1", Opts(32, 100, 4096, /*max_batch_tokens=*/40)},
      {"layer2", Opts(1, 0, 4096)},
  };
  Recorder rec;
  std::atomic<int> limit_violations{0};
  Scheduler::Options options;
  options.worker_threads = 2;
  options.idle_spin_us = idle_spin_us;
  auto scheduler = Scheduler::Create(options, [&](const std::string& q, std::vector<Entry> b) {
    const BatchingOptions& o = queues.at(q);
    int64_t tokens = 0;
    for (const Entry& e : b) tokens += e.tokens;
    if (b.empty() || b.size() > static_cast<size_t>(o.max_batch_size) ||
        (b.size() > 1 && tokens > o.max_batch_tokens)) {
      ++limit_violations;
    }
    rec.Record(q, b);
  });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  for (const auto& [name, o] : queues) ASSERT_TRUE(s.AddQueue(name, o).ok());

  std::vector<std::thread> producers;
  std::atomic<int> schedule_errors{0};
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p] {
      for (int i = 0; i < kItemsPerProducer; ++i) {
        Item item = MakeItem(p, i);
        const std::string queue = "layer" + std::to_string((p + i) % 3);
        if (!s.Schedule(queue, item, 1 + (p * 7 + i) % 12).ok()) ++schedule_errors;
      }
    });
  }
  for (std::thread& t : producers) t.join();
  ASSERT_TRUE(rec.WaitForItems(kProducers * kItemsPerProducer));
  s.Shutdown();
  EXPECT_EQ(schedule_errors.load(), 0);
  EXPECT_EQ(limit_violations.load(), 0);

  std::vector<std::vector<int>> runs(kProducers, std::vector<int>(kItemsPerProducer, 0));
  for (const Recorder::Batch& b : rec.batches()) {
    std::map<int, int> last_seq;  // producer -> seq, for FIFO within the batch
    for (const Request& r : b.requests) {
      ++runs[r.producer][r.seq];
      EXPECT_EQ(b.queue, "layer" + std::to_string((r.producer + r.seq) % 3));
      auto [it, inserted] = last_seq.emplace(r.producer, r.seq);
      if (!inserted) {
        EXPECT_LT(it->second, r.seq);
        it->second = r.seq;
      }
    }
  }
  for (int p = 0; p < kProducers; ++p) {
    for (int i = 0; i < kItemsPerProducer; ++i) ASSERT_EQ(runs[p][i], 1) << p << "/" << i;
  }
  EXPECT_EQ(rec.items(), kProducers * kItemsPerProducer);
  for (const auto& [name, o] : queues) EXPECT_EQ(s.QueueDepth(name), 0u);
}

TEST(BatchSchedulerTest, ManyProducersEveryItemRunsExactlyOnce) { RunManyProducers(0); }

// Idle workers that poll before sleeping lose nothing either (the poll and the sleep race with Schedule).
TEST(BatchSchedulerTest, ManyProducersWithIdleSpin) { RunManyProducers(500); }

// Eager mode under load: what arrives while the only worker computes forms full batches next. The first
// batch is held in run_batch until every item is queued, so the batches after it are exactly determined.
TEST(BatchSchedulerTest, RequestsArrivingWhileTheWorkerComputesFormFullBatches) {
  constexpr int kProducers = 8, kItemsPerProducer = 500, kMaxBatch = 32;
  Recorder rec;
  absl::Notification all_queued;
  auto scheduler = Scheduler::Create({}, [&](const std::string& q, std::vector<Entry> b) {
    all_queued.WaitForNotification();
    rec.Record(q, b);
  });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  ASSERT_TRUE(s.AddQueue("layer", Opts(kMaxBatch, /*max_queue_delay_us=*/0, /*max_queue_size=*/4096)).ok());
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p] {
      for (int i = 0; i < kItemsPerProducer; ++i) {
        Item item = MakeItem(p, i);
        EXPECT_TRUE(s.Schedule("layer", item, 1).ok());
      }
    });
  }
  for (std::thread& t : producers) t.join();
  all_queued.Notify();
  ASSERT_TRUE(rec.WaitForItems(kProducers * kItemsPerProducer));
  s.Shutdown();
  const std::vector<Recorder::Batch> batches = rec.batches();
  std::vector<int> next_seq(kProducers, 0);  // one worker: global FIFO per producer
  for (size_t i = 0; i < batches.size(); ++i) {
    for (const Request& r : batches[i].requests) EXPECT_EQ(r.seq, next_seq[r.producer]++);
    // After the first batch everything was waiting: every batch is full but the last.
    if (i > 0 && i + 1 < batches.size()) {
      EXPECT_EQ(batches[i].requests.size(), static_cast<size_t>(kMaxBatch)) << i;
    }
  }
  const size_t rest = kProducers * kItemsPerProducer - batches.front().requests.size();
  EXPECT_EQ(batches.size(), 1 + (rest + kMaxBatch - 1) / kMaxBatch);
}

TEST(BatchSchedulerTest, ShutdownRunsEverythingQueuedThenRejects) {
  Recorder rec;
  auto scheduler = Scheduler::Create({}, [&](const std::string& q, std::vector<Entry> b) { rec.Record(q, b); });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  // Neither the size nor the delay (an hour) can close these batches: only the shutdown flush can.
  ASSERT_TRUE(s.AddQueue("a", Opts(/*max_batch_size=*/4, /*max_queue_delay_us=*/3'600'000'000)).ok());
  ASSERT_TRUE(s.AddQueue("b", Opts(100, 3'600'000'000)).ok());
  for (int i = 0; i < 3; ++i) {
    Item item = MakeItem(0, i);
    ASSERT_TRUE(s.Schedule("a", item, 1).ok());
  }
  for (int i = 0; i < 10; ++i) {
    Item item = MakeItem(1, i);
    ASSERT_TRUE(s.Schedule("b", item, 1).ok());
  }
  EXPECT_EQ(s.QueueDepth("a"), 3u);
  EXPECT_EQ(s.QueueDepth("b"), 10u);
  s.Shutdown();
  EXPECT_EQ(rec.items(), 13);
  EXPECT_EQ(s.QueueDepth("a"), 0u);
  EXPECT_EQ(s.QueueDepth("b"), 0u);
  EXPECT_EQ(s.InflightBatches(), 0);

  Item late = MakeItem(2, 0);
  absl::Status st = s.Schedule("a", late, 1);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(st.message(), "server is shutting down");
  ASSERT_NE(late, nullptr);
  EXPECT_EQ(late->producer, 2);
  s.Shutdown();  // idempotent
  EXPECT_EQ(rec.items(), 13);
}

TEST(BatchSchedulerTest, ShutdownFlushKeepsBatchLimits) {
  Recorder rec;
  auto scheduler = Scheduler::Create({}, [&](const std::string& q, std::vector<Entry> b) { rec.Record(q, b); });
  ASSERT_TRUE(scheduler.ok());
  ASSERT_TRUE((*scheduler)->AddQueue("a", Opts(4, 3'600'000'000, 1024, /*max_batch_tokens=*/10)).ok());
  const int64_t tokens[] = {3, 3, 3, 3, 20, 1, 1, 1};
  for (int i = 0; i < 8; ++i) {
    Item item = MakeItem(0, i);
    ASSERT_TRUE((*scheduler)->Schedule("a", item, tokens[i]).ok());
  }
  scheduler->reset();  // the destructor shuts down
  std::vector<size_t> sizes;
  for (const auto& b : rec.batches()) sizes.push_back(b.requests.size());
  // 3+3+3 (the fourth 3 would exceed 10), then 3 (20 does not fit), 20 alone, then 1+1+1.
  EXPECT_EQ(sizes, (std::vector<size_t>{3, 1, 1, 3}));
}

// Shutdown while a batch runs: it waits for that batch, runs what was accepted before it began, and every
// Schedule either succeeds (and the item runs) or returns UNAVAILABLE (and the caller keeps the item).
TEST(BatchSchedulerTest, ShutdownDuringRunningBatchDropsNothing) {
  Recorder rec;
  absl::Notification started, gate;
  Scheduler::Options options;
  options.worker_threads = 2;
  auto scheduler = Scheduler::Create(options, [&](const std::string& q, std::vector<Entry> b) {
    if (!started.HasBeenNotified()) {
      started.Notify();
      gate.WaitForNotification();
    }
    rec.Record(q, b);
  });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  ASSERT_TRUE(s.AddQueue("a", Opts(4, 1'000'000)).ok());
  int accepted = 0;
  for (int i = 0; i < 4; ++i) {  // one full batch, which blocks in run_batch
    Item item = MakeItem(0, i);
    ASSERT_TRUE(s.Schedule("a", item, 1).ok());
    ++accepted;
  }
  ASSERT_TRUE(started.WaitForNotificationWithTimeout(kHangTimeout));
  std::thread stopper([&] { s.Shutdown(); });
  // Keep scheduling until the shutdown is seen. No ASSERT until the stopper is joined.
  int unexpected = 0;
  for (int i = 4;; ++i) {
    Item item = MakeItem(0, i);
    absl::Status st = s.Schedule("a", item, 1);
    if (st.ok()) {
      ++accepted;
      continue;
    }
    if (st.code() == absl::StatusCode::kResourceExhausted && item != nullptr) {  // outran the workers
      std::this_thread::yield();
      --i;  // retry the same item number, so that the accepted ones stay 0..accepted-1
      continue;
    }
    if (st.code() != absl::StatusCode::kUnavailable || item == nullptr) ++unexpected;
    break;
  }
  gate.Notify();
  stopper.join();
  EXPECT_EQ(unexpected, 0);
  EXPECT_EQ(rec.items(), accepted);
  EXPECT_EQ(s.InflightBatches(), 0);
  std::vector<int> seen(accepted, 0);
  for (const auto& b : rec.batches()) {
    EXPECT_LE(b.requests.size(), 4u);
    for (const Request& r : b.requests) {
      ASSERT_LT(r.seq, accepted);
      ++seen[r.seq];
    }
  }
  for (int i = 0; i < accepted; ++i) EXPECT_EQ(seen[i], 1) << i;
}

// The oldest waiting request goes first, whatever its queue.
TEST(BatchSchedulerTest, PicksTheQueueWithTheOldestRequest) {
  testing::FakeClock clock;
  std::vector<std::string> order;
  absl::Mutex order_mu;
  absl::Notification started, gate;
  Scheduler::Options options;
  options.clock = &clock;
  auto scheduler = Scheduler::Create(options, [&](const std::string& q, std::vector<Entry> b) {
    if (q == "block") {
      started.Notify();
      gate.WaitForNotification();
      return;
    }
    absl::MutexLock lock(&order_mu);
    for (const Entry& e : b) order.push_back(q + std::to_string(e.item->seq));
  });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  for (const char* name : {"block", "a", "b", "c"}) ASSERT_TRUE(s.AddQueue(name, Opts(1, 0)).ok());
  Item blocker = MakeItem(0, 0);
  ASSERT_TRUE(s.Schedule("block", blocker, 1).ok());
  ASSERT_TRUE(started.WaitForNotificationWithTimeout(kHangTimeout));
  // With the only worker busy: b1, a1, c1, b2, a2, one microsecond apart.
  const std::vector<std::pair<std::string, int>> arrivals = {{"b", 1}, {"a", 1}, {"c", 1}, {"b", 2}, {"a", 2}};
  for (const auto& [queue, seq] : arrivals) {
    clock.Advance(absl::Microseconds(1));
    Item item = MakeItem(0, seq);
    ASSERT_TRUE(s.Schedule(queue, item, 1).ok());
  }
  gate.Notify();
  s.Shutdown();
  EXPECT_EQ(order, (std::vector<std::string>{"b1", "a1", "c1", "b2", "a2"}));
}

// Several workers really run batches at the same time.
TEST(BatchSchedulerTest, WorkersRunConcurrently) {
  constexpr int kWorkers = 3;
  absl::Mutex mu;
  int running = 0;
  Scheduler::Options options;
  options.worker_threads = kWorkers;
  auto scheduler = Scheduler::Create(options, [&](const std::string&, std::vector<Entry>) {
    absl::MutexLock lock(&mu);
    ++running;
    // Returns only once all workers are inside run_batch at once (or fails after the timeout).
    auto all_in = [&]() { return running >= kWorkers; };
    EXPECT_TRUE(mu.AwaitWithTimeout(absl::Condition(&all_in), kHangTimeout));
  });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  ASSERT_TRUE(s.AddQueue("a", Opts(1, 0)).ok());
  for (int i = 0; i < kWorkers; ++i) {
    Item item = MakeItem(0, i);
    ASSERT_TRUE(s.Schedule("a", item, 1).ok());
  }
  s.Shutdown();
  EXPECT_EQ(running, kWorkers);
}

// worker_threads = 3 and a 200 ms delay: full batches close at once. The fake clock never moves, so the delay
// can never be what closes a batch here: only the size can, and the test finishing proves it did.
TEST(BatchSchedulerTest, SizeTriggeredBatchesDoNotWaitForTheDelay) {
  constexpr int kBatch = 8, kFullBatches = 6;
  testing::FakeClock clock;
  Recorder rec;
  Scheduler::Options options;
  options.worker_threads = 3;
  options.clock = &clock;
  auto scheduler = Scheduler::Create(options, [&](const std::string& q, std::vector<Entry> b) { rec.Record(q, b); });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  ASSERT_TRUE(s.AddQueue("layer", Opts(kBatch, /*max_queue_delay_us=*/200'000)).ok());
  for (int i = 0; i < kBatch * kFullBatches + 3; ++i) {
    Item item = MakeItem(0, i);
    ASSERT_TRUE(s.Schedule("layer", item, 1).ok());
  }
  ASSERT_TRUE(rec.WaitForItems(kBatch * kFullBatches));
  ASSERT_TRUE(clock.AwaitWaiters(3));  // every worker asleep: nothing else can close
  // The 3 left over cannot close by size, and the frozen clock keeps their delay from expiring.
  EXPECT_EQ(s.QueueDepth("layer"), 3u);
  for (const auto& b : rec.batches()) EXPECT_EQ(b.requests.size(), static_cast<size_t>(kBatch));
  s.Shutdown();  // flushes them
  EXPECT_EQ(rec.items(), kBatch * kFullBatches + 3);
  EXPECT_EQ(rec.batches().back().requests.size(), 3u);
}

// The delay path in virtual time: the worker sleeps in the fake clock until the oldest request's delay has
// passed, not a microsecond earlier.
TEST(BatchSchedulerTest, DelayTriggeredCloseWithFakeClock) {
  testing::FakeClock clock;
  Recorder rec;
  Scheduler::Options options;
  options.clock = &clock;
  auto scheduler = Scheduler::Create(options, [&](const std::string& q, std::vector<Entry> b) { rec.Record(q, b); });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  ASSERT_TRUE(s.AddQueue("layer", Opts(32, /*max_queue_delay_us=*/2'000)).ok());
  for (int i = 0; i < 5; ++i) {
    Item item = MakeItem(0, i);
    ASSERT_TRUE(s.Schedule("layer", item, 1).ok());
    clock.Advance(absl::Microseconds(100));  // the first request is the oldest: 500 us waited
  }
  ASSERT_TRUE(clock.AwaitWaiters(1));
  clock.Advance(absl::Microseconds(1'499));  // 1999 us: one short
  ASSERT_TRUE(clock.AwaitWaiters(1));
  EXPECT_EQ(rec.items(), 0);
  clock.Advance(absl::Microseconds(1));
  ASSERT_TRUE(rec.WaitForItems(5));
  ASSERT_EQ(rec.batches().size(), 1u);
  EXPECT_EQ(rec.batches()[0].requests.size(), 5u);
}

// Several queues with different delays, random arrivals and random steps of virtual time: no batch closes
// before its oldest request's delay unless it is full, and every request runs.
TEST(BatchSchedulerTest, DelaysOfManyQueuesInVirtualTime) {
  testing::FakeClock clock;
  Recorder rec;
  std::atomic<int> early{0};
  std::map<std::string, int64_t> delay_us = {{"a", 300}, {"b", 1'000}, {"c", 0}};
  Scheduler::Options options;
  options.clock = &clock;
  options.worker_threads = 2;
  auto scheduler = Scheduler::Create(options, [&](const std::string& q, std::vector<Entry> b) {
    const absl::Time now = clock.Now();
    if (b.size() < 4 && now - b.front().enqueued < absl::Microseconds(delay_us.at(q))) ++early;
    rec.Record(q, b);
  });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  for (const auto& [name, d] : delay_us) ASSERT_TRUE(s.AddQueue(name, Opts(4, d)).ok());
  std::mt19937 rng(7);
  int scheduled = 0;
  for (int step = 0; step < 300; ++step) {
    const std::string q = std::string(1, static_cast<char>('a' + rng() % 3));
    Item item = MakeItem(0, step);
    ASSERT_TRUE(s.Schedule(q, item, 1).ok());
    ++scheduled;
    clock.Advance(absl::Microseconds(rng() % 400));
  }
  clock.Advance(absl::Seconds(1));
  ASSERT_TRUE(rec.WaitForItems(scheduled));
  EXPECT_EQ(early.load(), 0);
}

// The same with the real clock: a lone request runs after about the delay, not before.
TEST(BatchSchedulerTest, DelayTriggeredCloseWithRealClock) {
  Recorder rec;
  auto scheduler = Scheduler::Create({}, [&](const std::string& q, std::vector<Entry> b) { rec.Record(q, b); });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  ASSERT_TRUE(s.AddQueue("layer", Opts(32, /*max_queue_delay_us=*/20'000)).ok());
  const absl::Time start = absl::Now();
  Item item = MakeItem(0, 0);
  ASSERT_TRUE(s.Schedule("layer", item, 1).ok());
  ASSERT_TRUE(rec.WaitForItems(1));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(20));
}

// RemoveQueue: refuses new items at once, runs what the queue holds (even behind a delay that would never
// pass), returns once its last batch is done, and the name can be added again afterwards.
TEST(BatchSchedulerTest, RemoveQueueRunsWhatItHoldsThenErases) {
  testing::FakeClock clock;  // never advanced: only the removal can close these batches
  Recorder rec;
  Scheduler::Options options;
  options.clock = &clock;
  auto scheduler = Scheduler::Create(options, [&](const std::string& q, std::vector<Entry> b) { rec.Record(q, b); });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  ASSERT_TRUE(s.AddQueue("old", Opts(4, /*max_queue_delay_us=*/3'600'000'000)).ok());
  ASSERT_TRUE(s.AddQueue("other", Opts(4, 3'600'000'000)).ok());
  for (int i = 0; i < 10; ++i) {
    Item item = MakeItem(0, i);
    ASSERT_TRUE(s.Schedule(i < 7 ? "old" : "other", item, 1).ok());
  }
  ASSERT_TRUE(s.RemoveQueue("old").ok());
  EXPECT_EQ(rec.items(), 7);  // all of "old", in batches of at most 4; "other" untouched
  for (const auto& b : rec.batches()) {
    EXPECT_EQ(b.queue, "old");
    EXPECT_LE(b.requests.size(), 4u);
  }
  EXPECT_EQ(s.QueueDepth("other"), 3u);
  Item late = MakeItem(1, 0);
  absl::Status st = s.Schedule("old", late, 1);
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(st.message(), "no layer named 'old'");
  ASSERT_NE(late, nullptr);
  EXPECT_EQ(s.RemoveQueue("old").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(s.UpdateQueue("old", Opts(8, 0)).code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(s.AddQueue("old", Opts(8, 0)).ok());
  ASSERT_TRUE(s.Schedule("old", late, 1).ok());
  ASSERT_TRUE(rec.WaitForItems(8));
  s.Shutdown();
  EXPECT_EQ(rec.items(), 11);
}

// RemoveQueue while its batch runs: it waits for that batch to return.
TEST(BatchSchedulerTest, RemoveQueueWaitsForTheRunningBatch) {
  absl::Notification started, gate;
  std::atomic<bool> batch_done{false};
  auto scheduler = Scheduler::Create({}, [&](const std::string&, std::vector<Entry>) {
    if (!started.HasBeenNotified()) started.Notify();
    gate.WaitForNotification();
    batch_done.store(true);
  });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  ASSERT_TRUE(s.AddQueue("a", Opts(4, 0)).ok());
  Item item = MakeItem(0, 0);
  ASSERT_TRUE(s.Schedule("a", item, 1).ok());
  ASSERT_TRUE(started.WaitForNotificationWithTimeout(kHangTimeout));
  std::atomic<bool> removed{false};
  std::thread remover([&] {
    EXPECT_TRUE(s.RemoveQueue("a").ok());
    EXPECT_TRUE(batch_done.load());  // never before the batch returned
    removed.store(true);
  });
  Item refused = MakeItem(0, 1);
  // Refused as soon as the removal began; until then the queue still accepts (and will run) items.
  absl::Status st;
  while (true) {
    st = s.Schedule("a", refused, 1);
    if (st.ok()) refused = MakeItem(0, 1);
    if (st.code() == absl::StatusCode::kResourceExhausted) std::this_thread::yield();  // full until removal
    if (!st.ok() && st.code() != absl::StatusCode::kResourceExhausted) break;
  }
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(removed.load());
  gate.Notify();
  remover.join();
  EXPECT_TRUE(removed.load());
}

// UpdateQueue: new limits apply to the next batch taken.
TEST(BatchSchedulerTest, UpdateQueueAppliesToTheNextBatch) {
  Recorder rec;
  absl::Notification started, gate;
  auto scheduler = Scheduler::Create({}, [&](const std::string& q, std::vector<Entry> b) {
    if (!started.HasBeenNotified()) {
      started.Notify();
      gate.WaitForNotification();
    }
    rec.Record(q, b);
  });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  ASSERT_TRUE(s.AddQueue("a", Opts(2, 0)).ok());
  Item first = MakeItem(0, 0);
  ASSERT_TRUE(s.Schedule("a", first, 1).ok());
  ASSERT_TRUE(started.WaitForNotificationWithTimeout(kHangTimeout));
  for (int i = 1; i <= 6; ++i) {
    Item item = MakeItem(0, i);
    ASSERT_TRUE(s.Schedule("a", item, 1).ok());
  }
  absl::Status bad = s.UpdateQueue("a", Opts(0, 0));
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.message(), "layer 'a': max_batch_size must be >= 1, got 0");
  ASSERT_TRUE(s.UpdateQueue("a", Opts(6, 0)).ok());
  gate.Notify();
  ASSERT_TRUE(rec.WaitForItems(7));
  s.Shutdown();
  std::vector<size_t> sizes;
  for (const auto& b : rec.batches()) sizes.push_back(b.requests.size());
  EXPECT_EQ(sizes, (std::vector<size_t>{1, 6}));
}

// Producers on several queues while one queue is removed and re-added over and over: every accepted item
// runs exactly once (for ThreadSanitizer as much as for the counts).
TEST(BatchSchedulerTest, QueuesAddedAndRemovedUnderLoad) {
  constexpr int kProducers = 4, kItemsPerProducer = 400, kCycles = 30;
  Recorder rec;
  Scheduler::Options options;
  options.worker_threads = 2;
  auto scheduler = Scheduler::Create(options, [&](const std::string& q, std::vector<Entry> b) { rec.Record(q, b); });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  ASSERT_TRUE(s.AddQueue("stable", Opts(8, 0, 4096)).ok());
  ASSERT_TRUE(s.AddQueue("churn", Opts(8, 0, 4096)).ok());
  std::atomic<int64_t> accepted{0};
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p] {
      for (int i = 0; i < kItemsPerProducer; ++i) {
        Item item = MakeItem(p, i);
        const absl::Status st = s.Schedule(i % 2 ? "churn" : "stable", item, 1);
        if (st.ok()) {
          ++accepted;
        } else {
          EXPECT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
        }
      }
    });
  }
  for (int c = 0; c < kCycles; ++c) {
    EXPECT_TRUE(s.RemoveQueue("churn").ok());
    EXPECT_TRUE(s.AddQueue("churn", Opts(8, 0, 4096)).ok());
  }
  for (std::thread& t : producers) t.join();
  s.Shutdown();
  EXPECT_EQ(rec.items(), accepted.load());
  EXPECT_GE(accepted.load(), kProducers * kItemsPerProducer / 2);  // every "stable" item at least
}

// The observer hears every depth change and the running batches, in order.
class RecordingObserver : public SchedulerObserver {
 public:
  void QueueDepthChanged(const std::string& queue, size_t depth) override {
    absl::MutexLock lock(&mu_);
    depths_.push_back(queue + "=" + std::to_string(depth));
  }
  void InflightBatchesChanged(int64_t batches) override {
    absl::MutexLock lock(&mu_);
    inflight_.push_back(batches);
  }
  std::vector<std::string> depths() const {
    absl::MutexLock lock(&mu_);
    return depths_;
  }
  std::vector<int64_t> inflight() const {
    absl::MutexLock lock(&mu_);
    return inflight_;
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<std::string> depths_ ABSL_GUARDED_BY(mu_);
  std::vector<int64_t> inflight_ ABSL_GUARDED_BY(mu_);
};

TEST(BatchSchedulerTest, ObserverSeesQueueDepthAndInflightBatches) {
  RecordingObserver observer;
  absl::Notification started, gate;
  Scheduler::Options options;
  options.observer = &observer;
  auto scheduler = Scheduler::Create(options, [&](const std::string&, std::vector<Entry>) {
    if (!started.HasBeenNotified()) {
      started.Notify();
      gate.WaitForNotification();
    }
  });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  ASSERT_TRUE(s.AddQueue("a", Opts(2, 0)).ok());
  Item first = MakeItem(0, 0);
  ASSERT_TRUE(s.Schedule("a", first, 1).ok());
  ASSERT_TRUE(started.WaitForNotificationWithTimeout(kHangTimeout));
  for (int i = 1; i <= 3; ++i) {
    Item item = MakeItem(0, i);
    ASSERT_TRUE(s.Schedule("a", item, 1).ok());
  }
  gate.Notify();
  ASSERT_TRUE(s.RemoveQueue("a").ok());
  s.Shutdown();
  // Pushed (1), taken (0); three pushed while the first batch runs (1, 2, 3); taken two (1), then one (0);
  // removed (0).
  EXPECT_EQ(observer.depths(), (std::vector<std::string>{"a=1", "a=0", "a=1", "a=2", "a=3", "a=1", "a=0", "a=0"}));
  EXPECT_EQ(observer.inflight(), (std::vector<int64_t>{1, 0, 1, 0, 1, 0}));
}

// A lone client: one request at a time on queue "a" (batches of 1), each sent once the one before has run and
// its worker is idle again; records the thread each ran on.
class LoneClient {
 public:
  explicit LoneClient(const Scheduler::Options& options) {
    auto scheduler = Scheduler::Create(options, [this](const std::string&, std::vector<Entry>) {
      absl::MutexLock lock(&mu_);
      ran_on_.push_back(std::this_thread::get_id());
    });
    EXPECT_TRUE(scheduler.ok()) << scheduler.status();
    scheduler_ = std::move(*scheduler);
    EXPECT_TRUE(scheduler_->AddQueue("a", Opts(1, 0)).ok());
  }
  Scheduler& scheduler() { return *scheduler_; }

  // Sends request `i`; returns once nothing is queued or in flight, so that its worker polls or sleeps again
  // (it starts either before it releases the lock it ended the batch under). False on a hang. The queue is
  // read first: a worker takes the request off it and counts its batch in flight under one lock, so the
  // other order could see neither (the first form of this test did, once in a few hundred runs).
  bool Send(int i) {
    Item item = MakeItem(0, i);
    if (!scheduler_->Schedule("a", item, 1).ok()) return false;
    const absl::Time deadline = absl::Now() + kHangTimeout;
    while (scheduler_->QueueDepth("a") > 0 || scheduler_->InflightBatches() > 0) {
      if (absl::Now() > deadline) return false;
      std::this_thread::yield();
    }
    return true;
  }

  // Shuts the scheduler down; every one of `requests` ran on the first one's thread.
  void ExpectAllOnOneThread(int requests) {
    scheduler_->Shutdown();
    absl::MutexLock lock(&mu_);
    ASSERT_EQ(ran_on_.size(), static_cast<size_t>(requests));
    for (int i = 1; i < requests; ++i) EXPECT_EQ(ran_on_[i], ran_on_[0]) << "request " << i;
  }

 private:
  absl::Mutex mu_;
  std::vector<std::thread::id> ran_on_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<Scheduler> scheduler_;
};

// One request at a time: each goes to the worker polling since it answered the last one. The other stays
// asleep: waking it would only have it poll too, on a CPU the answer needs. The polls last the whole test
// (Shutdown ends them), so which worker polls is never a matter of timing.
TEST(BatchSchedulerTest, ARequestGoesToThePollingWorkerAndWakesNoOther) {
  testing::FakeClock clock;
  Scheduler::Options options;
  options.clock = &clock;
  options.worker_threads = 2;
  options.idle_spin_us = absl::ToInt64Microseconds(kHangTimeout);
  LoneClient client(options);
  // Both workers poll from the start: the one the first request does not go to sees it gone and sleeps.
  const absl::Time both_poll_by = absl::Now() + kHangTimeout;
  while (client.scheduler().PollingWorkers() < 2) {
    ASSERT_LT(absl::Now(), both_poll_by);
    std::this_thread::yield();
  }
  ASSERT_TRUE(client.Send(0));
  ASSERT_TRUE(clock.AwaitWaiters(1));
  const int64_t woken = client.scheduler().WorkersWoken();
  constexpr int kRequests = 50;
  for (int i = 1; i < kRequests; ++i) {
    ASSERT_TRUE(client.Send(i));
    ASSERT_EQ(client.scheduler().WorkersWoken(), woken) << "request " << i << " woke the sleeping worker";
  }
  client.ExpectAllOnOneThread(kRequests);
}

// With no polling, every worker sleeps between a lone client's requests; each request still goes to the worker
// that ran the last one (the last to fall asleep), whose core has the layer's weights in its caches. A single
// condition variable for all wakes the one asleep the longest instead: the requests alternated workers.
TEST(BatchSchedulerTest, ARequestWakesTheWorkerAsleepTheShortestTime) {
  testing::FakeClock clock;
  Scheduler::Options options;
  options.clock = &clock;
  options.worker_threads = 3;
  LoneClient client(options);
  constexpr int kRequests = 20;
  for (int i = 0; i < kRequests; ++i) {
    ASSERT_TRUE(clock.AwaitWaiters(3));  // every worker asleep, the one that ran last the last to sleep
    ASSERT_TRUE(client.Send(i));
  }
  client.ExpectAllOnOneThread(kRequests);
}

// A lone client's next request arrives while the worker that answered the last one still finishes its batch
// (it answers inside run_batch). Past ThisWorkerLooksForWorkSoon, that worker takes it when run_batch returns,
// and the other stays asleep; without the call, the push wakes the sleeper (the check below failed at request 1).
TEST(BatchSchedulerTest, ARequestSentWhileItsWorkerFinishesWaitsForItAndWakesNoOther) {
  testing::FakeClock clock;
  Scheduler::Options options;
  options.clock = &clock;
  options.worker_threads = 2;
  absl::Mutex mu;
  std::vector<std::thread::id> ran_on;
  int sent = 1;  // requests scheduled; each batch returns only once the next one is (or all are)
  constexpr int kRequests = 20;
  auto scheduler = Scheduler::Create(options, [&](const std::string&, std::vector<Entry>) {
    Scheduler::ThisWorkerLooksForWorkSoon();
    Scheduler::ThisWorkerLooksForWorkSoon();  // once counts
    absl::MutexLock lock(&mu);
    ran_on.push_back(std::this_thread::get_id());
    const size_t ran = ran_on.size();
    auto next_sent = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
      return sent > static_cast<int>(ran) || sent == kRequests;
    };
    mu.Await(absl::Condition(&next_sent));
  });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  // On a failed check, lets the batch waiting in run_batch return before the scheduler's destructor waits for it.
  absl::Cleanup release = [&] {
    absl::MutexLock lock(&mu);
    sent = kRequests;
  };
  ASSERT_TRUE(s.AddQueue("a", Opts(1, 0)).ok());
  ASSERT_TRUE(clock.AwaitWaiters(2));
  Item first = MakeItem(0, 0);
  ASSERT_TRUE(s.Schedule("a", first, 1).ok());
  const int64_t woken = s.WorkersWoken();  // the first request woke one
  for (int i = 1; i < kRequests; ++i) {
    {
      absl::MutexLock lock(&mu);  // request i - 1 is in run_batch, past the call
      auto running = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return ran_on.size() == static_cast<size_t>(i); };
      ASSERT_TRUE(mu.AwaitWithTimeout(absl::Condition(&running), kHangTimeout)) << "request " << i - 1;
    }
    ASSERT_TRUE(clock.AwaitWaiters(1));  // the other worker asleep
    Item item = MakeItem(0, i);
    ASSERT_TRUE(s.Schedule("a", item, 1).ok());
    ASSERT_EQ(s.WorkersWoken(), woken) << "request " << i << " woke the sleeping worker";
    absl::MutexLock lock(&mu);
    ++sent;
  }
  auto ran_at_least = [&](size_t n) {
    absl::MutexLock lock(&mu);
    auto ran = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return ran_on.size() >= n; };
    return mu.AwaitWithTimeout(absl::Condition(&ran), kHangTimeout);
  };
  ASSERT_TRUE(ran_at_least(kRequests));  // before anything else wakes the other worker
  // Nothing is left counted as finishing: with both workers asleep, a push wakes one again.
  ASSERT_TRUE(clock.AwaitWaiters(2));
  Item last = MakeItem(0, kRequests);
  ASSERT_TRUE(s.Schedule("a", last, 1).ok());
  EXPECT_EQ(s.WorkersWoken(), woken + 1);
  ASSERT_TRUE(ran_at_least(kRequests + 1));
  absl::MutexLock lock(&mu);
  for (int i = 1; i < kRequests; ++i) EXPECT_EQ(ran_on[i], ran_on[0]) << "request " << i;
}

// Outside a worker's batch (here on the test's thread) the call does nothing: a push still wakes a sleeping
// worker.
TEST(BatchSchedulerTest, LooksForWorkSoonIsANoOpOffTheWorkers) {
  testing::FakeClock clock;
  Scheduler::Options options;
  options.clock = &clock;
  Recorder rec;
  auto scheduler = Scheduler::Create(options, [&](const std::string& q, std::vector<Entry> b) { rec.Record(q, b); });
  ASSERT_TRUE(scheduler.ok());
  ASSERT_TRUE((*scheduler)->AddQueue("a", Opts(1, 0)).ok());
  ASSERT_TRUE(clock.AwaitWaiters(1));
  Scheduler::ThisWorkerLooksForWorkSoon();
  Item item = MakeItem(0, 0);
  ASSERT_TRUE((*scheduler)->Schedule("a", item, 1).ok());
  EXPECT_EQ((*scheduler)->WorkersWoken(), 1);
  ASSERT_TRUE(rec.WaitForItems(1));
}

TEST(IdleWorkersTest, WakesTheLastAsleepFirstAndEachOnce) {
  absl::Mutex mu;
  absl::MutexLock lock(&mu);
  IdleWorkers idle(3);
  absl::CondVar* first = idle.Sleeping(0);
  EXPECT_NE(first, idle.Sleeping(1));
  idle.Sleeping(2);
  idle.Awake(1);  // its wait ended on its own (a deadline)
  EXPECT_EQ(idle.asleep(), 2u);
  idle.WakeOne();  // worker 2
  EXPECT_EQ(idle.asleep(), 1u);
  idle.Awake(2);  // no-op: already taken off
  EXPECT_EQ(idle.asleep(), 1u);
  idle.WakeAll();
  EXPECT_EQ(idle.asleep(), 0u);
  idle.WakeOne();  // none asleep: nothing to do
  EXPECT_EQ(idle.asleep(), 0u);
  EXPECT_EQ(idle.woken(), 2);
}

// on_idle runs on a worker once it has run out of work: not before any work, not between batches while work
// is queued. The first batch is held until everything is queued, so the rest runs back to back.
TEST(BatchSchedulerTest, OnIdleRunsOnceAfterWork) {
  testing::FakeClock clock;
  std::atomic<int> idles{0};
  Recorder rec;
  absl::Notification started, gate;
  Scheduler::Options options;
  options.clock = &clock;
  options.on_idle = [&] { ++idles; };
  auto scheduler = Scheduler::Create(options, [&](const std::string& q, std::vector<Entry> b) {
    if (!started.HasBeenNotified()) {
      started.Notify();
      gate.WaitForNotification();
    }
    rec.Record(q, b);
  });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  ASSERT_TRUE(s.AddQueue("a", Opts(2, 0)).ok());
  ASSERT_TRUE(clock.AwaitWaiters(1));
  EXPECT_EQ(idles.load(), 0);  // no work yet: nothing to give back
  Item first = MakeItem(0, 0);
  ASSERT_TRUE(s.Schedule("a", first, 1).ok());
  ASSERT_TRUE(started.WaitForNotificationWithTimeout(kHangTimeout));
  for (int i = 1; i < 5; ++i) {
    Item item = MakeItem(0, i);
    ASSERT_TRUE(s.Schedule("a", item, 1).ok());
  }
  gate.Notify();
  ASSERT_TRUE(rec.WaitForItems(5));
  ASSERT_TRUE(clock.AwaitWaiters(1));
  EXPECT_EQ(idles.load(), 1);
  EXPECT_EQ(rec.batches().size(), 3u);  // [0], [1, 2], [3, 4]
  s.Shutdown();
}

// With idle_release_delay_us, on_idle waits until the worker has had no work for that long: work arriving
// within the delay runs on the scratch of before, and the wait starts again after it.
TEST(BatchSchedulerTest, OnIdleWaitsForTheReleaseDelay) {
  testing::FakeClock clock;
  std::atomic<int> idles{0};
  Recorder rec;
  Scheduler::Options options;
  options.clock = &clock;
  options.on_idle = [&] { ++idles; };
  options.idle_release_delay_us = 1000;
  auto scheduler = Scheduler::Create(options, [&](const std::string& q, std::vector<Entry> b) { rec.Record(q, b); });
  ASSERT_TRUE(scheduler.ok());
  Scheduler& s = **scheduler;
  ASSERT_TRUE(s.AddQueue("a", Opts(1, 0)).ok());
  for (int i = 0; i < 2; ++i) {
    Item item = MakeItem(0, i);
    ASSERT_TRUE(s.Schedule("a", item, 1).ok());
    ASSERT_TRUE(rec.WaitForItems(i + 1));
    ASSERT_TRUE(clock.AwaitWaiters(1));  // idle, waiting out the delay
    clock.Advance(absl::Microseconds(999));
    ASSERT_TRUE(clock.AwaitWaiters(1));
    EXPECT_EQ(idles.load(), 0);  // not yet: 1 us short (the second time, of the second item's 1000 us)
  }
  clock.Advance(absl::Microseconds(1));
  const absl::Time deadline = absl::Now() + kHangTimeout;
  while (idles.load() == 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
  EXPECT_EQ(idles.load(), 1);
  clock.Advance(absl::Seconds(10));
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_EQ(idles.load(), 1);  // once per stretch of idleness
  s.Shutdown();
  options.idle_release_delay_us = -1;
  auto bad = Scheduler::Create(options, [](const std::string&, std::vector<Entry>) {});
  EXPECT_EQ(bad.status().message(), "idle_release_delay_us must be >= 0, got -1");
}

}  // namespace
}  // namespace attnserve

namespace attnserve {
namespace {

// The express lane: while the only worker runs a long batch, short items (cost = seq here) run one by one on
// the express worker, oldest first; a long item at a queue's front is left to the workers (FIFO per queue
// holds), and with no long batch running the express worker takes nothing.
TEST(BatchSchedulerTest, ExpressLaneRunsShortItemsBesideALongBatch) {
  Recorder regular, express;
  absl::Notification long_started, release_long;
  Scheduler::Options options;
  options.worker_threads = 1;
  options.long_item_cost = 100;
  options.cost = [](const Item& item) { return static_cast<double>(item->seq); };
  auto scheduler = Scheduler::Create(
      options,
      [&](const std::string& queue, std::vector<Entry> batch) {
        regular.Record(queue, batch);
        if (batch.front().item->seq >= 100 && !long_started.HasBeenNotified()) {
          long_started.Notify();
          EXPECT_TRUE(release_long.WaitForNotificationWithTimeout(kHangTimeout));
        }
      },
      [&](const std::string& queue, std::vector<Entry> batch) {
        EXPECT_EQ(batch.size(), 1u);
        express.Record(queue, batch);
      });
  ASSERT_TRUE(scheduler.ok()) << scheduler.status();
  Scheduler& s = **scheduler;
  ASSERT_TRUE(s.AddQueue("a", Opts(8, 0)).ok());
  ASSERT_TRUE(s.AddQueue("b", Opts(8, 0)).ok());

  // No long batch: short work goes to the worker.
  Item warm = MakeItem(0, 1);
  ASSERT_TRUE(s.Schedule("b", warm, 1).ok());
  ASSERT_TRUE(regular.WaitForItems(1));

  Item long_item = MakeItem(0, 1000);
  ASSERT_TRUE(s.Schedule("a", long_item, 1).ok());
  ASSERT_TRUE(long_started.WaitForNotificationWithTimeout(kHangTimeout));
  for (int seq : {2, 3, 4}) {
    Item item = MakeItem(1, seq);
    ASSERT_TRUE(s.Schedule("b", item, 1).ok());
  }
  ASSERT_TRUE(express.WaitForItems(3));  // while the long batch still runs
  Item long_b = MakeItem(1, 500), short_after = MakeItem(1, 5);
  ASSERT_TRUE(s.Schedule("b", long_b, 1).ok());
  ASSERT_TRUE(s.Schedule("b", short_after, 1).ok());
  EXPECT_EQ(s.QueueDepth("b"), 2u);  // the long front stays for a worker, the short one behind it too
  release_long.Notify();
  ASSERT_TRUE(regular.WaitForItems(4));  // warm, the long one of a, then b's [500, 5]
  s.Shutdown();

  std::vector<int> express_seqs;
  for (const auto& b : express.batches()) express_seqs.push_back(b.requests[0].seq);
  EXPECT_EQ(express_seqs, (std::vector<int>{2, 3, 4}));
  const auto batches = regular.batches();
  ASSERT_EQ(batches.size(), 3u);
  EXPECT_EQ(batches[2].queue, "b");
  ASSERT_EQ(batches[2].requests.size(), 2u);
  EXPECT_EQ(batches[2].requests[0].seq, 500);
  EXPECT_EQ(batches[2].requests[1].seq, 5);
}

TEST(BatchSchedulerTest, ExpressLaneNeedsCostAndItsRunFunction) {
  auto noop = [](const std::string&, std::vector<Entry>) {};
  Scheduler::Options options;
  options.long_item_cost = 1;
  EXPECT_EQ(Scheduler::Create(options, noop, noop).status().code(), absl::StatusCode::kInvalidArgument);
  options.cost = [](const Item&) { return 1.0; };
  EXPECT_EQ(Scheduler::Create(options, noop).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Scheduler::Create(options, noop, noop).ok());
  options.long_item_cost = -1;
  EXPECT_EQ(Scheduler::Create(options, noop, noop).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace attnserve
