// BatchQueue: the batching policy alone, on one thread, with a fake clock (no sleeps).
#include "server/batching/batch_queue.h"

#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tests/testing/batching_options.h"
#include "tests/testing/fake_clock.h"

namespace attnserve {
namespace {

using Item = std::unique_ptr<int>;  // move-only, like the server's requests
using Queue = BatchQueue<Item>;

using testing::Opts;

void PushId(Queue& q, int id, int64_t tokens = 1) {
  Item item = std::make_unique<int>(id);
  ASSERT_TRUE(q.Push(item, tokens).ok());
  EXPECT_EQ(item, nullptr);  // moved into the queue
}

std::vector<int> Ids(const std::vector<Queue::Entry>& batch) {
  std::vector<int> ids;
  for (const auto& e : batch) ids.push_back(*e.item);
  return ids;
}

using Ints = std::vector<int>;

TEST(BatchingOptionsTest, DefaultsAreValid) { EXPECT_TRUE(BatchingOptions().Validate().ok()); }

TEST(BatchingOptionsTest, ValidateNamesTheField) {
  struct Case {
    BatchingOptions options;
    const char* message;
  };
  const Case cases[] = {
      {Opts(0, 0), "max_batch_size must be >= 1, got 0"},
      {Opts(-3, 0), "max_batch_size must be >= 1, got -3"},
      {Opts(1, -1), "max_queue_delay_us must be >= 0 (0 = eager), got -1"},
      {Opts(1, 0, 0), "max_queue_size must be >= 1, got 0"},
      {Opts(1, 0, 1, 0), "max_batch_tokens must be >= 1, got 0"},
  };
  for (const Case& c : cases) {
    absl::Status s = c.options.Validate();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(s.message(), c.message);
  }
  EXPECT_TRUE(Opts(1, 0, 1, 1).Validate().ok());
}

TEST(BatchQueueTest, SizeTriggeredClose) {
  testing::FakeClock clock;
  Queue q(Opts(/*max_batch_size=*/4, /*max_queue_delay_us=*/1'000'000), &clock);
  EXPECT_TRUE(q.empty());
  EXPECT_FALSE(q.Ready());
  for (int i = 0; i < 3; ++i) PushId(q, i);
  EXPECT_FALSE(q.Ready());
  EXPECT_TRUE(q.TakeBatch().empty());
  EXPECT_EQ(q.size(), 3u);
  PushId(q, 3);
  EXPECT_TRUE(q.Ready());
  for (int i = 4; i < 6; ++i) PushId(q, i);
  EXPECT_EQ(Ids(q.TakeBatch()), (Ints{0, 1, 2, 3}));
  EXPECT_EQ(q.size(), 2u);
  EXPECT_EQ(q.tokens(), 2);
  EXPECT_FALSE(q.Ready());  // 2 < 4 and no time has passed
  EXPECT_TRUE(q.TakeBatch().empty());
}

TEST(BatchQueueTest, TokensTriggeredClose) {
  testing::FakeClock clock;
  Queue q(Opts(/*max_batch_size=*/32, /*max_queue_delay_us=*/1'000'000, 1024, /*max_batch_tokens=*/100), &clock);
  PushId(q, 0, 40);
  PushId(q, 1, 40);
  EXPECT_FALSE(q.Ready());  // 80 < 100, room left
  EXPECT_EQ(q.tokens(), 80);
  PushId(q, 2, 30);
  EXPECT_TRUE(q.Ready());  // 80 + 30 > 100: the batch cannot grow any more
  EXPECT_EQ(Ids(q.TakeBatch()), (Ints{0, 1}));
  EXPECT_EQ(q.tokens(), 30);
  EXPECT_FALSE(q.Ready());
  PushId(q, 3, 70);
  EXPECT_TRUE(q.Ready());  // exactly 100 reached
  EXPECT_EQ(Ids(q.TakeBatch()), (Ints{2, 3}));
  EXPECT_TRUE(q.empty());
  EXPECT_EQ(q.tokens(), 0);
}

TEST(BatchQueueTest, OversizeItemFormsABatchAlone) {
  testing::FakeClock clock;
  Queue q(Opts(32, 1'000'000, 1024, /*max_batch_tokens=*/100), &clock);
  PushId(q, 0, 500);
  EXPECT_TRUE(q.Ready());
  EXPECT_EQ(Ids(q.TakeBatch()), (Ints{0}));

  // Behind a small one: the small one goes first, alone; then the big one, alone.
  PushId(q, 1, 10);
  EXPECT_FALSE(q.Ready());
  PushId(q, 2, 500);
  PushId(q, 3, 10);
  EXPECT_TRUE(q.Ready());
  EXPECT_EQ(Ids(q.TakeBatch()), (Ints{1}));
  EXPECT_TRUE(q.Ready());
  EXPECT_EQ(Ids(q.TakeBatch()), (Ints{2}));
  EXPECT_FALSE(q.Ready());
  EXPECT_EQ(q.tokens(), 10);
}

TEST(BatchQueueTest, ZeroTokenItemsCountOnlyTowardSize) {
  testing::FakeClock clock;
  Queue q(Opts(3, 1'000'000, 1024, 10), &clock);
  PushId(q, 0, 0);
  PushId(q, 1, 0);
  EXPECT_FALSE(q.Ready());
  PushId(q, 2, 0);
  EXPECT_TRUE(q.Ready());
  EXPECT_EQ(Ids(q.TakeBatch()), (Ints{0, 1, 2}));
}

TEST(BatchQueueTest, DelayTriggeredCloseExactlyAtTheBoundary) {
  testing::FakeClock clock;
  Queue q(Opts(32, /*max_queue_delay_us=*/1000), &clock);
  const absl::Time t0 = clock.Now();
  PushId(q, 0);
  clock.Advance(absl::Microseconds(400));
  PushId(q, 1);
  EXPECT_EQ(q.NextReadyTime(), t0 + absl::Microseconds(1000));
  clock.Advance(absl::Microseconds(599));  // 999us after the first push
  EXPECT_FALSE(q.Ready());
  EXPECT_TRUE(q.TakeBatch().empty());
  clock.Advance(absl::Microseconds(1));  // exactly 1000us
  EXPECT_TRUE(q.Ready());
  EXPECT_EQ(Ids(q.TakeBatch()), (Ints{0, 1}));  // the younger one rides along
  EXPECT_FALSE(q.Ready());
}

TEST(BatchQueueTest, EagerModeClosesImmediately) {
  testing::FakeClock clock;
  Queue q(Opts(/*max_batch_size=*/3, /*max_queue_delay_us=*/0), &clock);
  EXPECT_FALSE(q.Ready());
  EXPECT_TRUE(q.TakeBatch().empty());
  PushId(q, 0);
  EXPECT_TRUE(q.Ready());
  EXPECT_EQ(q.NextReadyTime(), clock.Now());
  EXPECT_EQ(Ids(q.TakeBatch()), (Ints{0}));
  // What piled up while the workers were busy forms the next batches, up to max_batch_size.
  for (int i = 1; i <= 5; ++i) PushId(q, i);
  EXPECT_EQ(Ids(q.TakeBatch()), (Ints{1, 2, 3}));
  EXPECT_EQ(Ids(q.TakeBatch()), (Ints{4, 5}));
  EXPECT_TRUE(q.TakeBatch().empty());
}

TEST(BatchQueueTest, NoBatchingWithMaxBatchSizeOne) {
  testing::FakeClock clock;
  Queue q(Opts(1, 1'000'000), &clock);
  PushId(q, 0);
  EXPECT_TRUE(q.Ready());  // full at one entry: no waiting for the delay
  PushId(q, 1);
  EXPECT_EQ(Ids(q.TakeBatch()), (Ints{0}));
  EXPECT_EQ(Ids(q.TakeBatch()), (Ints{1}));
}

TEST(BatchQueueTest, FifoOrderAndEntryFields) {
  testing::FakeClock clock;
  Queue q(Opts(4, 0), &clock);
  std::vector<absl::Time> times;
  for (int i = 0; i < 10; ++i) {
    times.push_back(clock.Now());
    PushId(q, i, i + 1);
    clock.Advance(absl::Microseconds(7));
  }
  int next = 0;
  while (!q.empty()) {
    for (const auto& e : q.TakeBatch()) {
      EXPECT_EQ(*e.item, next);
      EXPECT_EQ(e.tokens, next + 1);
      EXPECT_EQ(e.enqueued, times[next]);
      ++next;
    }
  }
  EXPECT_EQ(next, 10);
}

TEST(BatchQueueTest, FullQueueLeavesTheItemUntouched) {
  testing::FakeClock clock;
  Queue q(Opts(32, 1'000'000, /*max_queue_size=*/2), &clock);
  PushId(q, 0);
  PushId(q, 1);
  Item item = std::make_unique<int>(42);
  int* const raw = item.get();
  absl::Status s = q.Push(item, 1);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(), "queue full: 2 requests waiting (max_queue_size)");
  ASSERT_EQ(item.get(), raw);
  EXPECT_EQ(*item, 42);
  EXPECT_EQ(q.size(), 2u);
  EXPECT_EQ(q.tokens(), 2);
  // Room again once a batch has been taken.
  ASSERT_EQ(q.TakeBatch(/*force=*/true).size(), 2u);
  EXPECT_TRUE(q.Push(item, 1).ok());
  EXPECT_EQ(item, nullptr);
}

TEST(BatchQueueTest, NegativeTokensRejectedItemUntouched) {
  testing::FakeClock clock;
  Queue q(Opts(32, 0), &clock);
  Item item = std::make_unique<int>(7);
  absl::Status s = q.Push(item, -1);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  ASSERT_NE(item, nullptr);
  EXPECT_EQ(*item, 7);
  EXPECT_TRUE(q.empty());
}

TEST(BatchQueueTest, NextReadyTime) {
  testing::FakeClock clock;
  Queue q(Opts(2, /*max_queue_delay_us=*/500), &clock);
  EXPECT_EQ(q.NextReadyTime(), absl::InfiniteFuture());
  EXPECT_EQ(q.OldestEnqueued(), absl::InfiniteFuture());
  const absl::Time t0 = clock.Now();
  PushId(q, 0);
  clock.Advance(absl::Microseconds(100));
  PushId(q, 1);
  clock.Advance(absl::Microseconds(100));
  PushId(q, 2);
  EXPECT_EQ(q.OldestEnqueued(), t0);
  EXPECT_EQ(q.NextReadyTime(), t0 + absl::Microseconds(500));
  ASSERT_EQ(q.TakeBatch().size(), 2u);  // size-triggered
  EXPECT_EQ(q.NextReadyTime(), t0 + absl::Microseconds(700));  // now the third one's
  ASSERT_EQ(q.TakeBatch(/*force=*/true).size(), 1u);
  EXPECT_EQ(q.NextReadyTime(), absl::InfiniteFuture());

  Queue eager(Opts(2, 0), &clock);
  const absl::Time t1 = clock.Now();
  PushId(eager, 0);
  clock.Advance(absl::Seconds(1));
  EXPECT_EQ(eager.NextReadyTime(), t1);
}

TEST(BatchQueueTest, RemoveIfKeepsTheOrderOfTheRest) {
  testing::FakeClock clock;
  Queue q(Opts(32, 1'000'000), &clock);
  for (int i = 0; i < 8; ++i) PushId(q, i, 10 + i);
  auto none = q.RemoveIf([](const Queue::Entry& e) { return *e.item > 100; });
  EXPECT_TRUE(none.empty());
  EXPECT_EQ(q.size(), 8u);

  auto removed = q.RemoveIf([](const Queue::Entry& e) { return *e.item % 3 == 1; });
  EXPECT_EQ(Ids(removed), (Ints{1, 4, 7}));
  EXPECT_EQ(q.size(), 5u);
  EXPECT_EQ(q.tokens(), 10 + 12 + 13 + 15 + 16);
  EXPECT_EQ(Ids(q.TakeBatch(/*force=*/true)), (Ints{0, 2, 3, 5, 6}));

  for (int i = 0; i < 3; ++i) PushId(q, i);
  EXPECT_EQ(q.RemoveIf([](const Queue::Entry&) { return true; }).size(), 3u);
  EXPECT_TRUE(q.empty());
  EXPECT_EQ(q.tokens(), 0);
  EXPECT_EQ(q.NextReadyTime(), absl::InfiniteFuture());
}

TEST(BatchQueueTest, RemovingTheOldestMovesTheDeadline) {
  testing::FakeClock clock;
  Queue q(Opts(32, 1000), &clock);
  PushId(q, 0);
  clock.Advance(absl::Microseconds(300));
  const absl::Time t1 = clock.Now();
  PushId(q, 1);
  q.RemoveIf([](const Queue::Entry& e) { return *e.item == 0; });
  EXPECT_EQ(q.NextReadyTime(), t1 + absl::Microseconds(1000));
  clock.Advance(absl::Microseconds(700));
  EXPECT_FALSE(q.Ready());  // the removed entry's deadline no longer counts
}

TEST(BatchQueueTest, ForceFlushIgnoresTimeButKeepsLimits) {
  testing::FakeClock clock;
  Queue q(Opts(/*max_batch_size=*/4, /*max_queue_delay_us=*/1'000'000, 1024, /*max_batch_tokens=*/25), &clock);
  for (int i = 0; i < 3; ++i) PushId(q, i, 5);
  EXPECT_FALSE(q.Ready());
  EXPECT_TRUE(q.TakeBatch().empty());
  EXPECT_EQ(Ids(q.TakeBatch(/*force=*/true)), (Ints{0, 1, 2}));
  EXPECT_TRUE(q.TakeBatch(/*force=*/true).empty());

  for (int i = 0; i < 10; ++i) PushId(q, i, 5);  // size limit 4 binds
  EXPECT_EQ(q.TakeBatch(true).size(), 4u);
  EXPECT_EQ(q.TakeBatch(true).size(), 4u);
  EXPECT_EQ(q.TakeBatch(true).size(), 2u);
  for (int i = 0; i < 3; ++i) PushId(q, i, 10);  // token limit 25 binds
  EXPECT_EQ(q.TakeBatch(true).size(), 2u);
  EXPECT_EQ(q.TakeBatch(true).size(), 1u);
  EXPECT_TRUE(q.empty());
}

// Reference Ready(): written from the definition, independently of the implementation's walk.
bool ModelReady(const std::vector<std::pair<int64_t, absl::Time>>& model, const BatchingOptions& o,
                absl::Time now) {
  if (model.empty()) return false;
  if (o.max_queue_delay_us == 0) return true;
  if (now - model.front().second >= absl::Microseconds(o.max_queue_delay_us)) return true;
  if (static_cast<int64_t>(model.size()) >= o.max_batch_size) return true;
  // The greedy prefix: full by tokens if it reaches the limit or stops before the end of the queue.
  int64_t sum = 0;
  size_t n = 0;
  while (n < model.size() && (n == 0 || sum + model[n].first <= o.max_batch_tokens)) sum += model[n++].first;
  return sum >= o.max_batch_tokens || n < model.size();
}

// Random pushes, clock moves, takes (normal and forced) and removals, checked against a model: every pushed
// item comes out exactly once and in order, no batch breaks a limit, and a batch is as large as allowed.
TEST(BatchQueuePropertyTest, RandomOperations) {
  std::mt19937_64 rng(20240611);
  const BatchingOptions configs[] = {
      Opts(1, 0, 64, 100),       Opts(8, 0, 64, 100),       Opts(8, 300, 50, 40),
      Opts(32, 1000, 200, 8192), Opts(5, 50, 16, 10),       Opts(16, 200, 1024, 64),
  };
  for (const BatchingOptions& o : configs) {
    SCOPED_TRACE(::testing::Message() << "batch=" << o.max_batch_size << " delay=" << o.max_queue_delay_us
                                    << " queue=" << o.max_queue_size << " tokens=" << o.max_batch_tokens);
    testing::FakeClock clock;
    Queue q(o, &clock);
    std::vector<std::pair<int64_t, absl::Time>> model;  // (tokens, enqueued) of what should be queued
    std::vector<int> model_ids;
    std::vector<int> seen_count;      // per id
    int next_id = 0, last_taken = -1, rejected = 0;
    auto check_batch = [&](const std::vector<Queue::Entry>& batch) {
      ASSERT_FALSE(batch.empty());
      ASSERT_LE(batch.size(), static_cast<size_t>(o.max_batch_size));
      int64_t sum = 0;
      for (const auto& e : batch) sum += e.tokens;
      if (batch.size() > 1) {
        ASSERT_LE(sum, o.max_batch_tokens);
      }
      // Maximal: FIFO prefix of the model, and the next entry could not have joined.
      ASSERT_LE(batch.size(), model.size());
      for (size_t i = 0; i < batch.size(); ++i) {
        ASSERT_EQ(*batch[i].item, model_ids[i]);
        ASSERT_EQ(batch[i].tokens, model[i].first);
        ASSERT_EQ(batch[i].enqueued, model[i].second);
        ASSERT_GT(*batch[i].item, last_taken);  // in order across batches
        last_taken = *batch[i].item;
        ++seen_count[*batch[i].item];
      }
      if (batch.size() < static_cast<size_t>(o.max_batch_size) && batch.size() < model.size()) {
        ASSERT_GT(sum + model[batch.size()].first, o.max_batch_tokens);
      }
      model.erase(model.begin(), model.begin() + batch.size());
      model_ids.erase(model_ids.begin(), model_ids.begin() + batch.size());
    };
    for (int step = 0; step < 5000; ++step) {
      const int op = static_cast<int>(rng() % 100);
      if (op < 50) {
        // Mostly small items, some near the limit, a few larger than a whole batch.
        const int kind = static_cast<int>(rng() % 20);
        const int64_t tokens = kind == 0   ? o.max_batch_tokens + static_cast<int64_t>(rng() % 50)
                               : kind < 4  ? static_cast<int64_t>(rng() % (o.max_batch_tokens + 1))
                                           : static_cast<int64_t>(rng() % (o.max_batch_tokens / 4 + 1));
        Item item = std::make_unique<int>(next_id);
        seen_count.push_back(0);
        absl::Status s = q.Push(item, tokens);
        if (static_cast<int32_t>(model.size()) >= o.max_queue_size) {
          ASSERT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
          ASSERT_NE(item, nullptr);
          ASSERT_EQ(*item, next_id);
          ++seen_count[next_id];  // answered by the caller: counts as coming out once
          ++rejected;
        } else {
          ASSERT_TRUE(s.ok()) << s;
          model.emplace_back(tokens, clock.Now());
          model_ids.push_back(next_id);
        }
        ++next_id;
      } else if (op < 65) {
        clock.Advance(absl::Microseconds(static_cast<int64_t>(rng() % (o.max_queue_delay_us / 2 + 20))));
      } else if (op < 95) {
        const bool force = rng() % 8 == 0;
        const bool ready = q.Ready();
        ASSERT_EQ(ready, ModelReady(model, o, clock.Now()));
        auto batch = q.TakeBatch(force);
        if (model.empty() || (!force && !ready)) {
          ASSERT_TRUE(batch.empty());
        } else {
          check_batch(batch);
        }
      } else {
        const int mod = 3 + static_cast<int>(rng() % 5);
        auto removed = q.RemoveIf([&](const Queue::Entry& e) { return *e.item % mod == 0; });
        std::vector<std::pair<int64_t, absl::Time>> kept;
        std::vector<int> kept_ids;
        size_t r = 0;
        for (size_t i = 0; i < model.size(); ++i) {
          if (model_ids[i] % mod == 0) {
            ASSERT_LT(r, removed.size());
            ASSERT_EQ(*removed[r++].item, model_ids[i]);
            ++seen_count[model_ids[i]];
          } else {
            kept.push_back(model[i]);
            kept_ids.push_back(model_ids[i]);
          }
        }
        ASSERT_EQ(r, removed.size());
        model = kept;
        model_ids = kept_ids;
      }
      ASSERT_EQ(q.size(), model.size());
      int64_t sum = 0;
      for (const auto& m : model) sum += m.first;
      ASSERT_EQ(q.tokens(), sum);
      ASSERT_EQ(q.NextReadyTime(), model.empty() ? absl::InfiniteFuture()
                                                 : model.front().second + absl::Microseconds(o.max_queue_delay_us));
    }
    while (!q.empty()) check_batch(q.TakeBatch(/*force=*/true));
    ASSERT_TRUE(model.empty());
    for (int id = 0; id < next_id; ++id) ASSERT_EQ(seen_count[id], 1) << "id " << id;
    EXPECT_GT(next_id, 2000);
    if (o.max_queue_size <= 16) {
      EXPECT_GT(rejected, 0);  // the full-queue path was exercised
    }
  }
}

}  // namespace
}  // namespace attnserve
