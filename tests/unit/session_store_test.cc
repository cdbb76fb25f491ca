// SessionStore driven from one thread: `submit` collects the started appends, the test runs them through
// the engine when it chooses, on a fake clock. Lanes keep arrival order and run one append at a time; idle
// sessions go after their timeout (not before) and when the pool is full; a failed append leaves the cache as
// it was; a long prefill goes in chunks that let another session's decode step in between; fork and truncate
// wait for appends in flight.
#include "server/sessions/session_store.h"

#include <deque>
#include <optional>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/half_float.h"
#include "gtest/gtest.h"
#include "server/sessions/prefill_chunks.h"
#include "server/startup/server_config.h"
#include "tests/testing/fake_clock.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

namespace v1 = attnserve::v1;
using testing::MaxAbsDiff;

constexpr int64_t kE = 16;

v1::LayerConfig TinyLayer(const std::string& name) {
  v1::LayerConfig c;
  c.set_name(name);
  c.set_embed_dim(kE);
  c.set_num_heads(2);
  c.set_seed(5);
  EXPECT_TRUE(ApplyLayerDefaultsAndValidate(&c).ok());
  return c;
}

// One append's request and what it got back.
struct Sent {
  std::vector<float> query;
  std::vector<uint16_t> bits;  // the rows as sent, when they were 16-bit
  absl::Status status = absl::UnknownError("not answered");
  bool answered = false;
  AttentionOutputs outputs;
  int64_t held_bytes = 0;  // of the memory budget, by the call as it was answered
  CallTiming timing;       // as answered
};

class SessionStoreTest : public ::testing::Test {
 protected:
  void SetUp() override { Build(int64_t{1} << 20, 512); }

  void Build(int64_t pool_bytes, int64_t chunk_tokens, MemoryBudget* memory = nullptr) {
    v1::ServerConfig config;
    *config.add_layers() = TinyLayer("l");
    registry_ = std::move(*LayerRegistry::Create(config));
    pool_ = std::move(*KvCachePool::Create({pool_bytes, 4}));
    SessionStore::Options o;
    o.pool = pool_.get();
    o.registry = registry_.get();
    o.clock = &clock_;
    o.submit = [this](std::unique_ptr<InferenceCall> call) { queue_.push_back(std::move(call)); };
    o.instrument = [this](InferenceCall& call) {
      call.finish = [this, self = &call, answer = std::move(call.finish)](const absl::Status& status) {
        const Shape& output = self->outputs.output.shape;
        instrumented_.push_back({status.code(), output.empty() ? -1 : output[0]});
        answer(status);
      };
    };
    o.default_idle_timeout_ms = 1000;
    o.prefill_chunk_tokens = chunk_tokens;
    o.memory = memory;
    o.shares = shares_;
    o.max_sessions = max_sessions_;
    store_ = std::move(*SessionStore::Create(o));
  }

  void Open(const std::string& id, int64_t idle_timeout_ms = 0) {
    SessionStore::OpenArgs args;
    args.id = id;
    args.layers = {"l"};
    args.idle_timeout_ms = idle_timeout_ms;
    ASSERT_TRUE(store_->Open(args).ok());
  }

  // Appends `tokens` random rows; the result is filled when the call is answered.
  std::shared_ptr<Sent> Append(const std::string& id, int64_t tokens, int64_t request_bytes = 0,
                               bool need_weights = false, const SessionStore::Caller& caller = {}) {
    auto sent = std::make_shared<Sent>();
    sent->query = testing::RandomValues(rng_, tokens * kE);
    auto call = std::make_unique<InferenceCall>();
    call->arrival = clock_.Now();
    call->request_bytes = request_bytes;
    call->inputs.query = TensorView::F32(sent->query.data(), {tokens, kE});
    call->inputs.need_weights = need_weights;
    InferenceCall* self = call.get();
    call->finish = [sent, self](const absl::Status& s) {
      sent->status = s;
      sent->answered = true;
      sent->held_bytes = self->memory.bytes();
      sent->timing = self->timing;
      if (s.ok()) sent->outputs = std::move(self->outputs);
    };
    store_->Append(id, "l", std::move(call), caller);
    return sent;
  }

  // Appends `tokens` random rows sent as bfloat16 or float16 bits (`dtype`), which the call views as the
  // service does (the request's bytes, counted in request_bytes); sent->query holds the f32 values they carry
  // and sent->bits the rows themselves.
  std::shared_ptr<Sent> AppendHalf(const std::string& id, int64_t tokens, DType dtype) {
    auto sent = std::make_shared<Sent>();
    for (float v : testing::RandomValues(rng_, tokens * kE)) {
      sent->bits.push_back(dtype == DType::kBFloat16 ? FloatToBFloat16(v) : FloatToHalf(v));
      sent->query.push_back(dtype == DType::kBFloat16 ? BFloat16ToFloat(sent->bits.back())
                                                      : HalfToFloat(sent->bits.back()));
    }
    auto call = std::make_unique<InferenceCall>();
    call->arrival = clock_.Now();
    call->request_bytes = tokens * kE * 2;
    call->inputs.query = {dtype, {tokens, kE}, sent->bits.data()};
    InferenceCall* self = call.get();
    call->finish = [sent, self](const absl::Status& s) {
      sent->status = s;
      sent->answered = true;
      if (s.ok()) sent->outputs = std::move(self->outputs);
    };
    store_->Append(id, "l", std::move(call));
    return sent;
  }

  // Runs the oldest started call through the engine (or fails it with `error`).
  void RunOne(absl::Status error = absl::OkStatus()) {
    ASSERT_FALSE(queue_.empty());
    std::unique_ptr<InferenceCall> call = std::move(queue_.front());
    queue_.pop_front();
    if (!error.ok()) {
      call->finish(error);
      return;
    }
    ++runs_;
    const CachedAppend* one[] = {&call->session->append};
    auto got = call->layer->engine->ForwardAppends(one, 1);
    ASSERT_TRUE(got[0].ok()) << got[0].status();
    call->outputs = std::move(*got[0]);
    if (compute_us_per_run_ > 0) {  // as the executor times a batch, the fake clock moving by its compute
      call->timing.queue_us = absl::ToInt64Microseconds(clock_.Now() - call->arrival);
      call->timing.compute_us = compute_us_per_run_;
      clock_.Advance(absl::Microseconds(compute_us_per_run_));
    }
    call->finish(absl::OkStatus());
  }
  void RunAll() {
    while (!queue_.empty()) RunOne();
  }

  // Causal attention over the concatenated queries of `sent`, the rows of the last one.
  std::vector<float> Reference(const std::vector<std::shared_ptr<Sent>>& sent) {
    std::vector<float> all;
    for (const auto& s : sent) all.insert(all.end(), s->query.begin(), s->query.end());
    AttentionInputs in;
    in.query = TensorView::F32(all.data(), {static_cast<int64_t>(all.size()) / kE, kE});
    in.is_causal = true;
    auto out = registry_->Find("l")->engine->Forward(in);
    const size_t last = sent.back()->query.size();
    return std::vector<float>(out->output.values.end() - last, out->output.values.end());
  }

  std::mt19937_64 rng_{42};
  testing::FakeClock clock_;
  std::unique_ptr<LayerRegistry> registry_;
  std::unique_ptr<KvCachePool> pool_;
  CpuShares* shares_ = nullptr;    // Options::shares of the next Build
  int64_t max_sessions_ = 10'000;  // Options::max_sessions of the next Build
  int64_t compute_us_per_run_ = 0;  // > 0: RunOne times each call as the executor would, the clock moving
  std::unique_ptr<SessionStore> store_;
  std::deque<std::unique_ptr<InferenceCall>> queue_;
  int runs_ = 0;  // calls run through the engine
  // What the instrumented finish saw of each answered append: its code and output rows (-1: none).
  std::vector<std::pair<absl::StatusCode, int64_t>> instrumented_;
};

TEST_F(SessionStoreTest, AppendsOfOneLaneRunInOrderOneAtATime) {
  Open("a");
  auto first = Append("a", 5);
  auto second = Append("a", 1);
  auto third = Append("a", 2);
  ASSERT_EQ(queue_.size(), 1u);  // the others wait for their turn
  RunOne();
  EXPECT_TRUE(first->status.ok());
  ASSERT_EQ(queue_.size(), 1u);
  RunAll();
  ASSERT_TRUE(second->status.ok() && third->status.ok());
  EXPECT_LE(MaxAbsDiff(second->outputs.output.values, Reference({first, second})), 1e-6);
  EXPECT_LE(MaxAbsDiff(third->outputs.output.values, Reference({first, second, third})), 1e-6);
  EXPECT_EQ(store_->Get("a")->layers[0].tokens, 8);
}

TEST_F(SessionStoreTest, IdleSessionsGoAfterTheirTimeoutNotBeforeAndNeverWithAppendsInFlight) {
  Open("idle", 1000);
  Open("busy", 1000);
  auto pending = Append("busy", 1);  // started, not answered
  clock_.Advance(absl::Milliseconds(999));
  EXPECT_EQ(store_->EvictIdle("idle_timeout"), 0);
  clock_.Advance(absl::Milliseconds(2));
  EXPECT_EQ(store_->EvictIdle("idle_timeout"), 1);
  const auto gone = store_->Get("idle");
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(gone.status().message().find("evicted (idle_timeout)"), std::string::npos) << gone.status();
  EXPECT_TRUE(store_->Get("busy").ok());
  RunAll();
  EXPECT_TRUE(pending->status.ok());
  auto unknown = Append("never", 1);
  EXPECT_EQ(unknown->status.code(), absl::StatusCode::kNotFound);
}

TEST_F(SessionStoreTest, AFullPoolEvictsIdleSessionsThenRefuses) {
  // 16 blocks of 4 tokens x 16 wide: 64 tokens in all.
  Build(16 * pool_->BlockBytes(kE), 512);
  Open("old", 10);
  auto fill = Append("old", 60);
  RunAll();
  ASSERT_TRUE(fill->status.ok());
  Open("new", 10);
  auto refused = Append("new", 16);  // "old" is not idle long enough yet
  EXPECT_EQ(refused->status.code(), absl::StatusCode::kResourceExhausted) << refused->status;
  clock_.Advance(absl::Milliseconds(20));
  auto admitted = Append("new", 16);  // "new" itself was used just now: only "old" goes
  RunAll();
  EXPECT_TRUE(admitted->status.ok()) << admitted->status;
  EXPECT_NE(store_->Get("old").status().message().find("evicted (pool_full)"), std::string::npos);
}

TEST_F(SessionStoreTest, AFailedAppendLeavesTheCacheAsItWas) {
  Open("a");
  auto first = Append("a", 3);
  RunAll();
  auto failed = Append("a", 2);
  RunOne(absl::DeadlineExceededError("deadline"));
  EXPECT_EQ(failed->status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(store_->Get("a")->layers[0].tokens, 3);
  auto next = Append("a", 2);
  RunAll();
  EXPECT_LE(MaxAbsDiff(next->outputs.output.values, Reference({first, next})), 1e-6);
}

TEST_F(SessionStoreTest, ALongPrefillGoesInChunksWithOtherSessionsDecodeStepsBetween) {
  Build(int64_t{1} << 20, 4);
  Open("long");
  Open("chat");
  auto prefill = Append("long", 10);  // chunks of 4, 4, 2
  auto decode = Append("chat", 1);
  ASSERT_EQ(queue_.size(), 2u);
  RunOne();  // the first chunk
  ASSERT_EQ(queue_.size(), 2u);
  EXPECT_EQ(queue_.front()->session->append.tokens, 1);  // the decode step, then the next chunk
  RunAll();
  ASSERT_TRUE(prefill->status.ok()) << prefill->status;
  EXPECT_EQ(prefill->outputs.output.shape, (Shape{10, kE}));
  EXPECT_LE(MaxAbsDiff(prefill->outputs.output.values, Reference({prefill})), 1e-6);
  EXPECT_TRUE(decode->status.ok());
}

// A chunked append's timing covers its chunks: their compute is compute, the rest since it arrived is queue (its
// last chunk alone would say 1 chunk's compute after 2 chunks' "queue").
TEST_F(SessionStoreTest, AChunkedAppendsTimingCoversEveryChunk) {
  Build(int64_t{1} << 20, 4);
  compute_us_per_run_ = 100;
  Open("long");
  Open("chat");
  auto prefill = Append("long", 10);  // chunks of 4, 4, 2
  auto decode = Append("chat", 1);    // runs between the first two chunks
  RunAll();
  ASSERT_TRUE(prefill->status.ok()) << prefill->status;
  EXPECT_EQ(runs_, 4);
  EXPECT_EQ(prefill->timing.compute_us, 300);
  EXPECT_EQ(prefill->timing.queue_us, 100);  // the decode step's compute, between its chunks
  EXPECT_EQ(decode->timing.compute_us, 100);
  EXPECT_EQ(decode->timing.queue_us, 100);
}

// Every append is instrumented as it arrives (metrics, logs): one refused by the store is counted, and a chunked
// one's instrumented finish sees its whole answer, not its last chunk's.
TEST_F(SessionStoreTest, AppendsAreInstrumentedAsTheyArriveChunkedOnesWithTheirWholeAnswer) {
  Build(int64_t{1} << 20, 4);
  Open("long");
  auto missing = Append("nope", 1);
  auto prefill = Append("long", 10);  // chunks of 4, 4, 2
  RunAll();
  ASSERT_TRUE(prefill->status.ok()) << prefill->status;
  using Seen = std::pair<absl::StatusCode, int64_t>;
  EXPECT_EQ(instrumented_, (std::vector<Seen>{{absl::StatusCode::kNotFound, -1}, {absl::StatusCode::kOk, 10}}));
}

TEST(PrefillChunkTokens, KeepsEachChunksCostAsTheContextGrows) {
  EXPECT_EQ(PrefillChunkTokens(1024, 128, 0, 16), 128);  // a fresh session: the configured chunk
  EXPECT_EQ(PrefillChunkTokens(1024, 128, 8192, 16), 27);
  int64_t previous = 128;
  for (int64_t context = 0; context <= 65536; context += 1024) {
    const int64_t n = PrefillChunkTokens(1024, 128, context, 16);
    EXPECT_LE(n, previous) << context;
    const double e = 1024, cost = 8 * n * e * e + 4 * n * (context + n) * e;
    if (n > 16) {
      EXPECT_LE(cost, 8 * 128 * e * e + 4 * 128 * 128 * e) << context;  // never past the first's
    }
    previous = n;
  }
  EXPECT_EQ(PrefillChunkTokens(1024, 128, 1 << 20, 16), 16);  // at least a block
  EXPECT_EQ(PrefillChunkTokens(1024, 8, 1 << 20, 16), 8);     // or the chunk, when smaller
}

TEST_F(SessionStoreTest, ChunksShrinkAsTheContextGrows) {
  Build(int64_t{1} << 22, 64);
  Open("long");
  auto prefill = Append("long", 600);
  std::vector<int64_t> chunks;
  while (!queue_.empty()) {
    chunks.push_back(queue_.front()->session->append.tokens);
    RunOne();
  }
  ASSERT_TRUE(prefill->status.ok()) << prefill->status;
  EXPECT_EQ(chunks.front(), 64);
  EXPECT_LT(chunks[chunks.size() - 2], 64);  // the last full chunk, sized at a longer context
  for (size_t i = 1; i + 1 < chunks.size(); ++i) EXPECT_LE(chunks[i], chunks[i - 1]);
  EXPECT_LE(MaxAbsDiff(prefill->outputs.output.values, Reference({prefill})), 1e-5);
}

TEST_F(SessionStoreTest, AWaitingAppendHoldsItsRequestInTheMemoryBudget) {
  MemoryBudget budget(1000);
  Build(int64_t{1} << 20, 512, &budget);
  Open("a");
  auto running = Append("a", 1, 600);  // starts at once: the dispatcher (here: the test) reserves for it
  auto waiting = Append("a", 1, 600);  // waits: its 600 bytes are held from now on
  EXPECT_EQ(budget.reserved_bytes(), 600);
  auto refused = Append("a", 1, 600);
  EXPECT_EQ(refused->status.code(), absl::StatusCode::kResourceExhausted) << refused->status;
  EXPECT_NE(refused->status.message().find("memory budget"), std::string::npos) << refused->status;
  RunAll();
  EXPECT_TRUE(running->status.ok() && waiting->status.ok());
  EXPECT_EQ(budget.reserved_bytes(), 0);
}

// A chunked append holds its earlier chunks' answers until the last chunk, then their merge: both are reserved
// before its first chunk runs (no budget counted them before), and held with its answer until it is written.
TEST_F(SessionStoreTest, AChunkedAppendReservesItsChunksAnswersBeforeTheFirstRuns) {
  MemoryBudget budget(int64_t{1} << 30);
  Build(int64_t{1} << 20, 4, &budget);
  Open("long");
  auto prefill = Append("long", 10, 500, /*need_weights=*/true);  // chunks of 4, 4, 2
  const int64_t answer = 4 * (10 * kE + 10 * 10);                 // output [10, E], averaged weights [10, 10]
  // Its request (it did not wait: nothing held it), the chunks' answers, then the merged answer and the copy its
  // service encodes (this call is not sent in place); the test's submit stands for the dispatcher, which
  // reserves no chunk's own cost here.
  EXPECT_EQ(budget.reserved_bytes(), 500 + answer + 2 * answer);
  RunOne();
  EXPECT_EQ(budget.reserved_bytes(), 500 + 3 * answer);
  RunAll();
  ASSERT_TRUE(prefill->status.ok()) << prefill->status;
  EXPECT_EQ(prefill->held_bytes, 500 + 3 * answer) << "handed to the client's call with its answer";
  EXPECT_EQ(prefill->outputs.attn_weights.shape, (Shape{10, 10}));
  EXPECT_LE(MaxAbsDiff(prefill->outputs.output.values, Reference({prefill})), 1e-6);
  EXPECT_EQ(budget.reserved_bytes(), 0);
}

TEST_F(SessionStoreTest, AChunkedAppendPastTheBudgetIsRefusedBeforeAnyChunkRuns) {
  const int64_t answer = 4 * (10 * kE + 10 * 10);
  MemoryBudget budget(3 * answer - 1);
  Build(int64_t{1} << 20, 4, &budget);
  Open("long");
  auto refused = Append("long", 10, 0, /*need_weights=*/true);
  EXPECT_EQ(refused->status.code(), absl::StatusCode::kResourceExhausted) << refused->status;
  EXPECT_NE(refused->status.message().find("memory budget"), std::string::npos) << refused->status;
  EXPECT_TRUE(queue_.empty());
  EXPECT_EQ(budget.reserved_bytes(), 0);
  auto next = Append("long", 3);  // the cache as it was: the lane goes on from 0 tokens
  RunAll();
  ASSERT_TRUE(next->status.ok()) << next->status;
  EXPECT_LE(MaxAbsDiff(next->outputs.output.values, Reference({next})), 1e-6);
}

TEST_F(SessionStoreTest, AChunkedAppendFailingMidwayGivesItsReservationBack) {
  MemoryBudget budget(int64_t{1} << 30);
  Build(int64_t{1} << 20, 4, &budget);
  Open("long");
  auto failed = Append("long", 10, 500, /*need_weights=*/true);
  EXPECT_GT(budget.reserved_bytes(), 500);
  RunOne();
  RunOne(absl::DeadlineExceededError("deadline"));  // the second chunk
  EXPECT_EQ(failed->status.code(), absl::StatusCode::kDeadlineExceeded) << failed->status;
  EXPECT_TRUE(queue_.empty());
  EXPECT_EQ(budget.reserved_bytes(), 0);
}

// A cross-attention memory's keys and values ([S, E] each) are reserved while they are projected: past the budget
// the session is not opened.
TEST_F(SessionStoreTest, AMemorysProjectionIsReservedWhileItRuns) {
  MemoryBudget budget(2 * 40 * kE * 4 - 1);
  Build(int64_t{1} << 20, 512, &budget);
  const std::vector<float> memory = testing::RandomValues(rng_, 40 * kE);
  SessionStore::OpenArgs args;
  args.id = "x";
  args.layers = {"l"};
  args.memory["l"] = {memory.data(), 40, kE};
  const absl::StatusOr<SessionInfo> refused = store_->Open(args);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("memory budget"), std::string::npos) << refused.status();
  EXPECT_EQ(store_->Get("x").status().code(), absl::StatusCode::kNotFound);
  args.memory["l"].tokens = 39;
  const absl::StatusOr<SessionInfo> opened = store_->Open(args);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(opened->layers[0].tokens, 39);
  EXPECT_EQ(budget.reserved_bytes(), 0);
}

// A memory longer than a block reserves one block's keys and values: the rest are in the KV pool once projected.
TEST_F(SessionStoreTest, ALongMemoryReservesOneBlockOfItsProjection) {
  constexpr int64_t kRows = 2 * SessionStore::kMemoryBlockTokens + 77;
  const std::vector<float> memory = testing::RandomValues(rng_, kRows * kE);
  for (const int64_t budget_bytes :
       {2 * SessionStore::kMemoryBlockTokens * kE * 4 - 1, 2 * SessionStore::kMemoryBlockTokens * kE * 4}) {
    MemoryBudget budget(budget_bytes);
    store_.reset();
    Build(int64_t{1} << 20, 512, &budget);
    SessionStore::OpenArgs args;
    args.id = "x";
    args.layers = {"l"};
    args.memory["l"] = {memory.data(), kRows, kE};
    const absl::StatusOr<SessionInfo> opened = store_->Open(args);
    EXPECT_EQ(opened.status().code(),
              budget_bytes % 2 == 0 ? absl::StatusCode::kOk : absl::StatusCode::kResourceExhausted)
        << opened.status();
    EXPECT_EQ(budget.reserved_bytes(), 0);
  }
}

// A memory is projected kMemoryBlockTokens rows at a time, each block on a share of the CPUs taken as a batch
// takes one; the cache holds what projecting it whole gives: an append over it answers as attention over the
// memory itself (key = value = memory) does.
TEST_F(SessionStoreTest, AMemoryIsProjectedInBlocksEachOnACpuShare) {
  std::unique_ptr<CpuShares> shares = std::move(*CpuShares::Create({2}));
  shares_ = shares.get();
  Build(int64_t{1} << 20, 512);
  constexpr int64_t kRows = 2 * SessionStore::kMemoryBlockTokens + 77;
  const std::vector<float> memory = testing::RandomValues(rng_, kRows * kE);
  SessionStore::OpenArgs args;
  args.id = "x";
  args.layers = {"l"};
  args.memory["l"] = {memory.data(), kRows, kE};
  // As each block is about to be projected: the shares held and their threads. After the first block a batch
  // starts (a share taken and held to the end): each later block takes its part of what that batch left, so
  // the threads handed out stay 2 (a share held across blocks would keep 2 threads beside the batch's 1: 3).
  std::vector<int> running, threads;
  std::optional<CpuShares::Share> batch;
  args.is_cancelled = [&] {
    running.push_back(shares->held().running);
    threads.push_back(shares->held().threads);
    if (!batch) batch.emplace(shares->Take());
    return false;
  };
  const absl::StatusOr<SessionInfo> opened = store_->Open(args);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(opened->layers[0].tokens, kRows);
  EXPECT_EQ(running, std::vector<int>({1, 2, 2}));
  EXPECT_EQ(threads, std::vector<int>({2, 2, 2}));
  batch.reset();
  EXPECT_EQ(shares->held().running, 0);

  auto sent = Append("x", 5);
  RunAll();
  ASSERT_TRUE(sent->status.ok()) << sent->status;
  AttentionInputs in;
  in.query = TensorView::F32(sent->query.data(), {5, kE});
  in.key = in.value = TensorView::F32(memory.data(), {kRows, kE});
  const absl::StatusOr<AttentionOutputs> want = registry_->Find("l")->engine->Forward(in);
  ASSERT_TRUE(want.ok()) << want.status();
  EXPECT_LE(MaxAbsDiff(sent->outputs.output.values, want->output.values), 1e-5);
}

// An open cancelled, or whose deadline passes, while its memory is projected stops at the next block: nothing
// of it is kept (no session, no cache blocks, no reservation), and the error says how far it got.
TEST_F(SessionStoreTest, AnOpenStopsBetweenBlocksOnceCancelledOrPastItsDeadline) {
  MemoryBudget budget(int64_t{1} << 30);
  Build(int64_t{1} << 20, 512, &budget);
  constexpr int64_t kRows = 2 * SessionStore::kMemoryBlockTokens + 77;
  const std::vector<float> memory = testing::RandomValues(rng_, kRows * kE);
  for (const bool cancel : {true, false}) {
    SCOPED_TRACE(cancel ? "cancelled" : "deadline");
    SessionStore::OpenArgs args;
    args.id = "x";
    args.layers = {"l"};
    args.memory["l"] = {memory.data(), kRows, kE};
    args.deadline = clock_.Now() + absl::Seconds(1);
    int checks = 0;
    args.is_cancelled = [&] {
      if (++checks < 2) return false;
      if (!cancel) clock_.Advance(absl::Seconds(2));  // the deadline passes before the second block
      return cancel;
    };
    const absl::StatusOr<SessionInfo> stopped = store_->Open(args);
    EXPECT_EQ(stopped.status().code(), cancel ? absl::StatusCode::kCancelled : absl::StatusCode::kDeadlineExceeded)
        << stopped.status();
    EXPECT_NE(stopped.status().message().find(absl::StrCat("after projecting ", SessionStore::kMemoryBlockTokens,
                                                           " of the ", kRows, " rows of memory[l]")),
              std::string::npos)
        << stopped.status();
    EXPECT_EQ(checks, 2);
    EXPECT_EQ(store_->Get("x").status().code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(pool_->blocks_in_use(), 0);
    EXPECT_EQ(budget.reserved_bytes(), 0);
  }
}

// Whatever an open can be refused for besides the pool and the budget is found before any memory is projected
// (CheckOpen, which the service calls before it queues the open): a later layer unknown, a later memory of the
// wrong width, max_tokens past the layers' limit, an id taken, max_sessions reached.
TEST_F(SessionStoreTest, AnOpenIsRefusedBeforeAnyMemoryIsProjected) {
  max_sessions_ = 2;
  Build(int64_t{1} << 20, 512);
  Open("taken");
  const std::vector<float> memory = testing::RandomValues(rng_, 40 * kE);
  struct Case {
    const char* what;
    std::function<void(SessionStore::OpenArgs*)> change;
    absl::StatusCode code;
    const char* message;
  };
  const Case cases[] = {
      {"a later layer unknown", [](auto* a) { a->layers.push_back("nope"); }, absl::StatusCode::kNotFound,
       "layers[1]: no layer named 'nope'"},
      {"listed twice", [](auto* a) { a->layers.push_back("l"); }, absl::StatusCode::kInvalidArgument,
       "layers[1]: listed twice"},
      {"a memory of the wrong width", [](auto* a) { a->memory["l"].dim = kE + 1; }, absl::StatusCode::kInvalidArgument,
       "memory[l]: expected [S, 16]"},
      {"max_tokens past the limit", [](auto* a) { a->max_tokens = 1 << 30; }, absl::StatusCode::kInvalidArgument,
       "max_tokens: 1073741824 is past"},
      {"the id taken", [](auto* a) { a->id = "taken"; }, absl::StatusCode::kAlreadyExists, "exists"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    SessionStore::OpenArgs args;
    args.id = "x";
    args.layers = {"l"};
    args.memory["l"] = {memory.data(), 40, kE};
    int blocks = 0;
    args.is_cancelled = [&] { return ++blocks < 0; };
    c.change(&args);
    const absl::Status checked = store_->CheckOpen(args);
    EXPECT_EQ(checked.code(), c.code) << checked;
    EXPECT_NE(checked.message().find(c.message), std::string::npos) << checked;
    EXPECT_EQ(store_->Open(args).status(), checked);
    EXPECT_EQ(blocks, 0);
    EXPECT_EQ(pool_->blocks_in_use(), 0);
  }
  Open("second");
  SessionStore::OpenArgs args;
  args.id = "x";
  args.layers = {"l"};
  args.memory["l"] = {memory.data(), 40, kE};
  const absl::Status full = store_->CheckOpen(args);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_NE(full.message().find("max_sessions is 2"), std::string::npos) << full;
  EXPECT_TRUE(store_->Close("second").ok());
  EXPECT_TRUE(store_->CheckOpen(args).ok());
}

// A 16-bit query goes to the engine as it came: no f32 copy is reserved or made (a queued append holds its
// request's bytes only), the append views the request's rows, and its prefill chunks (rows of 2 bytes per
// value) answer as the f32 values they carry do.
TEST_F(SessionStoreTest, SixteenBitQueriesAreReadAsTheyCameChunksIncluded) {
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    SCOPED_TRACE(DTypeName(dtype));
    MemoryBudget budget(int64_t{1} << 20);
    queue_.clear();
    store_.reset();  // before the pool and registry it uses are replaced
    Build(int64_t{1} << 20, /*chunk_tokens=*/8, &budget);
    Open("a");
    auto first = AppendHalf("a", 30, dtype);   // in chunks of at most 8 tokens
    auto second = AppendHalf("a", 12, dtype);  // waits behind it, holding its 12 x 16 x 2 bytes
    // ... beside the first's request and chunked answer (ChunkedAnswerHeldBytes: its parts, its merge and the
    // copy sent), reserved as its chunks start.
    EXPECT_EQ(budget.reserved_bytes(), 12 * kE * 2 + 30 * kE * 2 + 3 * (30 * kE * 4));
    ASSERT_EQ(queue_.size(), 1u);
    EXPECT_EQ(queue_.front()->session->append.query_dtype, dtype);
    EXPECT_EQ(queue_.front()->session->append.query, first->bits.data()) << "the request's rows, in place";
    runs_ = 0;
    while (!first->answered) RunOne();
    EXPECT_GE(runs_, 4) << "30 tokens in chunks of at most 8";
    ASSERT_TRUE(first->status.ok()) << first->status;
    EXPECT_LE(MaxAbsDiff(first->outputs.output.values, Reference({first})), 1e-5);
    RunAll();
    ASSERT_TRUE(second->status.ok()) << second->status;
    EXPECT_LE(MaxAbsDiff(second->outputs.output.values, Reference({first, second})), 1e-5);
    EXPECT_EQ(budget.reserved_bytes(), 0);
    store_.reset();
  }
}

// With tokens, a session is its opener's: another token's Get, Append, Fork, Truncate and Close are refused
// (PERMISSION_DENIED naming session_id), an admin token may use it, and a fork is its forker's.
TEST_F(SessionStoreTest, ASessionIsItsOpenersUnlessTheCallerMayUseAny) {
  const SessionStore::Caller alice{"alice's digest", false}, bob{"bob's digest", false}, admin{"admin", true};
  SessionStore::OpenArgs args;
  args.id = "a";
  args.layers = {"l"};
  args.caller = alice;
  ASSERT_TRUE(store_->Open(args).ok());
  const auto refused = [](const absl::Status& s) {
    return s.code() == absl::StatusCode::kPermissionDenied && absl::StrContains(s.message(), "session_id: session") &&
           absl::StrContains(s.message(), "was opened with another token");
  };
  EXPECT_TRUE(refused(store_->Get("a", bob).status()));
  EXPECT_TRUE(refused(store_->Fork("a", "b", bob).status()));
  EXPECT_TRUE(refused(store_->Truncate("a", 0, bob).status()));
  EXPECT_TRUE(refused(store_->Close("a", bob)));
  const std::shared_ptr<Sent> theirs = Append("a", 2, 0, false, bob);
  EXPECT_TRUE(theirs->answered);
  EXPECT_TRUE(refused(theirs->status)) << theirs->status;
  EXPECT_TRUE(queue_.empty());

  EXPECT_TRUE(store_->Get("a", admin).ok());
  const std::shared_ptr<Sent> mine = Append("a", 2, 0, false, alice);
  RunOne();
  EXPECT_TRUE(mine->status.ok()) << mine->status;
  EXPECT_EQ(store_->Get("a", alice)->layers[0].tokens, 2);
  ASSERT_TRUE(store_->Fork("a", "a2", admin).ok());
  EXPECT_TRUE(refused(store_->Get("a2", alice).status()));
  EXPECT_TRUE(store_->Close("a2", admin).ok());
  EXPECT_TRUE(store_->Close("a", alice).ok());
}

TEST_F(SessionStoreTest, ForkAndTruncateWaitForAppendsInFlight) {
  Open("a");
  auto first = Append("a", 6);
  EXPECT_EQ(store_->Fork("a", "b").status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_->Truncate("a", 2).status().code(), absl::StatusCode::kFailedPrecondition);
  RunAll();
  ASSERT_TRUE(store_->Fork("a", "a:b").ok());
  EXPECT_EQ(store_->Fork("a", "a:b").status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(store_->Truncate("a", 2)->layers[0].tokens, 2);
  EXPECT_EQ(store_->Get("a:b")->layers[0].tokens, 6);
  EXPECT_EQ(store_->Fork("a", "bad id!").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace attnserve
