// BatchExecutor without threads or gRPC: batches built by hand, run on the test thread, answers compared
// with each call's own layer version run alone.
#include "server/runtime/batch_executor.h"

#include <omp.h>

#include <atomic>
#include <memory>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "server/startup/server_config.h"
#include "tests/testing/fake_clock.h"
#include "tests/testing/metric_values.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

constexpr int64_t kEmbed = 32;

std::shared_ptr<const ServedLayer> Version(uint64_t seed, int64_t version) {
  v1::LayerConfig c;
  c.set_name("layer");
  c.set_embed_dim(kEmbed);
  c.set_num_heads(4);
  c.set_seed(seed);
  EXPECT_TRUE(ApplyLayerDefaultsAndValidate(&c).ok());
  auto layer = LoadLayer(c);
  EXPECT_TRUE(layer.ok()) << layer.status();
  (*layer)->version = version;
  return std::shared_ptr<const ServedLayer>(std::move(*layer));
}

// A call with a random [b, l, E] query, validated against `layer`, recording how it was answered (the
// executor destroys the call once answered: `raw` is for setting it up only).
struct TestCall {
  std::vector<float> query;
  std::unique_ptr<InferenceCall> call = std::make_unique<InferenceCall>();
  InferenceCall* raw = call.get();
  std::shared_ptr<const ServedLayer> layer;
  AttentionInputs inputs;
  int64_t flops = 0;
  std::optional<absl::Status> status;  // set by finish
  AttentionOutputs answer;
  CallTiming timing;
};

std::unique_ptr<TestCall> MakeCall(std::shared_ptr<const ServedLayer> layer, std::mt19937_64& rng, int64_t b,
                                   int64_t l, absl::Time arrival) {
  auto t = std::make_unique<TestCall>();
  t->query = testing::RandomValues(rng, b * l * kEmbed);
  InferenceCall& c = *t->call;
  c.layer_name = "layer";
  c.inputs.query = TensorView::F32(t->query.data(), {b, l, kEmbed});
  c.inputs.need_weights = l % 2 == 0;
  c.arrival = arrival;
  c.layer = std::move(layer);
  auto parsed = c.layer->engine->Validate(c.inputs);
  EXPECT_TRUE(parsed.ok()) << parsed.status();
  c.parsed = *parsed;
  t->layer = c.layer;
  t->inputs = c.inputs;
  t->flops = c.parsed.flops;
  TestCall* self = t.get();
  c.finish = [self](const absl::Status& s) {
    self->status = s;
    if (!s.ok()) return;
    self->answer = self->raw->outputs;
    self->timing = self->raw->timing;
  };
  return t;
}

std::vector<CallScheduler::Entry> Batch(std::vector<std::unique_ptr<TestCall>>& calls, absl::Time enqueued) {
  std::vector<CallScheduler::Entry> batch;
  for (auto& t : calls) batch.push_back({std::move(t->call), t->raw->parsed.query_tokens(), enqueued});
  return batch;
}

TEST(BatchExecutorTest, CreateValidates) {
  EXPECT_EQ(BatchExecutor::Create({nullptr, nullptr, 1}).status().code(), absl::StatusCode::kInvalidArgument);
  auto bad = BatchExecutor::Create({nullptr, RealClock(), 0});
  EXPECT_EQ(bad.status().message(), "threads_per_batch must be >= 1, got 0");
}

// Calls of two versions of the layer in one batch (it was replaced while they waited): each is computed by
// the version it holds, equal to that version alone; timing and metrics are filled in.
TEST(BatchExecutorTest, EachCallComputedByItsOwnVersion) {
  testing::FakeClock clock;
  ServerMetrics metrics({"layer"});
  auto executor = BatchExecutor::Create({&metrics, &clock, 2});
  ASSERT_TRUE(executor.ok());
  const auto v1 = Version(1, 1), v2 = Version(2, 2);
  std::mt19937_64 rng(3);
  const absl::Time arrival = clock.Now();
  std::vector<std::unique_ptr<TestCall>> calls;
  for (int i = 0; i < 6; ++i) calls.push_back(MakeCall(i % 3 == 0 ? v2 : v1, rng, 1 + i % 2, 3 + i, arrival));
  clock.Advance(absl::Microseconds(250));
  (*executor)->Run("layer", Batch(calls, arrival));
  int64_t flops = 0;
  for (const auto& t : calls) {
    ASSERT_TRUE(t->status.has_value());
    ASSERT_TRUE(t->status->ok()) << *t->status;
    auto alone = t->layer->engine->Forward(t->inputs, 1);
    ASSERT_TRUE(alone.ok());
    EXPECT_LE(testing::MaxAbsDiff(t->answer.output.values, alone->output.values), 1e-6);
    EXPECT_LE(testing::MaxAbsDiff(t->answer.attn_weights.values, alone->attn_weights.values), 1e-6);
    EXPECT_EQ(t->timing.queue_us, 250);
    EXPECT_EQ(t->timing.batch_size, t->layer == v2 ? 2 : 4);
    flops += t->flops;
  }
  const auto counted = testing::FindMetric(*metrics.registry(), "attnserve_flops_total", {{"layer", "layer"}});
  ASSERT_TRUE(counted.has_value());
  EXPECT_EQ(counted->value, static_cast<double>(flops));
  const auto batches = testing::FindMetric(*metrics.registry(), "attnserve_batch_size", {{"layer", "layer"}});
  ASSERT_TRUE(batches.has_value());
  EXPECT_EQ(batches->sample_count, 2u);  // one engine call per version
}

// before_last_answer runs once per batch, on the thread that runs it, once the answers left are at most one per
// thread: before the last group's last answer (a batch of two versions computes them in turn), or before all of
// them when there are no more than threads. So the scheduler knows the worker is about to look for work while
// the last answers' clients may already send their next requests.
TEST(BatchExecutorTest, BeforeLastAnswerRunsOnceWithOneAnswerLeft) {
  testing::FakeClock clock;
  const auto v1 = Version(1, 1), v2 = Version(2, 2);
  std::mt19937_64 rng(5);
  std::vector<std::unique_ptr<TestCall>> calls;
  for (int i = 0; i < 7; ++i) calls.push_back(MakeCall(i % 3 == 0 ? v2 : v1, rng, 1, 2 + i, clock.Now()));
  std::vector<int> answered_before_hook;
  const std::thread::id runner = std::this_thread::get_id();
  BatchExecutor::Options options{nullptr, &clock, 2};
  options.before_last_answer = [&] {
    EXPECT_EQ(std::this_thread::get_id(), runner);
    int answered = 0;
    for (const auto& t : calls) answered += t->status.has_value() ? 1 : 0;
    answered_before_hook.push_back(answered);
  };
  auto executor = BatchExecutor::Create(options);
  ASSERT_TRUE(executor.ok());
  (*executor)->Run("layer", Batch(calls, clock.Now()));
  EXPECT_EQ(answered_before_hook, std::vector<int>{6});
  for (const auto& t : calls) {
    ASSERT_TRUE(t->status.has_value() && t->status->ok());
    EXPECT_EQ(t->timing.batch_size, t->layer == v2 ? 3 : 4);
  }
  answered_before_hook.clear();
  std::vector<std::unique_ptr<TestCall>> two;  // one per thread
  for (int i = 0; i < 2; ++i) two.push_back(MakeCall(v1, rng, 1, 3, clock.Now()));
  calls = std::move(two);
  (*executor)->Run("layer", Batch(calls, clock.Now()));
  EXPECT_EQ(answered_before_hook, std::vector<int>{0});
  for (const auto& t : calls) EXPECT_TRUE(t->status.has_value());
}

// Calls past their deadline or cancelled while queued are answered without compute; the rest run.
TEST(BatchExecutorTest, ExpiredAndCancelledCallsAreNotComputed) {
  testing::FakeClock clock;
  ServerMetrics metrics({"layer"});
  auto executor = BatchExecutor::Create({&metrics, &clock, 1});
  ASSERT_TRUE(executor.ok());
  const auto layer = Version(1, 1);
  std::mt19937_64 rng(4);
  const absl::Time arrival = clock.Now();
  std::vector<std::unique_ptr<TestCall>> calls;
  for (int i = 0; i < 3; ++i) calls.push_back(MakeCall(layer, rng, 1, 4, arrival));
  calls[0]->raw->deadline = arrival + absl::Microseconds(100);
  calls[1]->raw->is_cancelled = [] { return true; };
  calls[2]->raw->deadline = arrival + absl::Seconds(1);
  clock.Advance(absl::Microseconds(100));
  (*executor)->Run("layer", Batch(calls, arrival));
  EXPECT_EQ(calls[0]->status->code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(calls[0]->status->message(), "deadline passed while queued (waited 100 us)");
  EXPECT_EQ(calls[1]->status->code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(calls[1]->status->message(), "request cancelled while queued");
  EXPECT_TRUE(calls[2]->status->ok());
  EXPECT_EQ(calls[2]->timing.batch_size, 1);
  const auto counted = testing::FindMetric(*metrics.registry(), "attnserve_flops_total", {{"layer", "layer"}});
  EXPECT_EQ(counted->value, static_cast<double>(calls[2]->flops));
}

// The thread budget reaches the engine as an argument: the same batch on 1 and 2 threads gives the same
// answers (the engine may split the work differently, never the results).
TEST(BatchExecutorTest, ThreadBudgetDoesNotChangeAnswers) {
  const auto layer = Version(7, 1);
  std::vector<std::vector<float>> outputs[2];
  for (int threads : {1, 2}) {
    auto executor = BatchExecutor::Create({nullptr, RealClock(), threads});
    ASSERT_TRUE(executor.ok());
    std::mt19937_64 rng(9);  // same inputs for both budgets
    std::vector<std::unique_ptr<TestCall>> calls;
    for (int i = 0; i < 5; ++i) calls.push_back(MakeCall(layer, rng, 4, 40 + 9 * i, absl::Now()));
    (*executor)->Run("layer", Batch(calls, absl::Now()));
    for (const auto& t : calls) {
      ASSERT_TRUE(t->status->ok()) << *t->status;
      outputs[threads - 1].push_back(t->answer.output.values);
    }
  }
  for (size_t i = 0; i < outputs[0].size(); ++i) EXPECT_LE(testing::MaxAbsDiff(outputs[0][i], outputs[1][i]), 1e-6);
}

// With CPU shares, a batch holds its share until its calls are answered, on a team of its share's size (the
// answers are handed over inside that team), and one that starts while another batch holds every CPU runs on
// one thread. These requests are below the engine's single-thread size, so its answers are equal either way.
TEST(BatchExecutorTest, BatchesHoldTheirShareOfTheCpusWhileAnswering) {
  const auto layer = Version(7, 1);
  auto shares = CpuShares::Create({2});
  ASSERT_TRUE(shares.ok());
  auto executor = BatchExecutor::Create({nullptr, RealClock(), 2, shares->get()});
  ASSERT_TRUE(executor.ok());
  std::vector<std::vector<float>> outputs[2];
  for (int others : {0, 1}) {
    std::vector<CpuShares::Share> held;
    for (int i = 0; i < others; ++i) held.push_back((*shares)->Take());
    std::mt19937_64 rng(9);  // the same inputs both times
    std::vector<std::unique_ptr<TestCall>> calls;
    for (int i = 0; i < 5; ++i) calls.push_back(MakeCall(layer, rng, 4, 40 + 9 * i, absl::Now()));
    std::vector<int> running_at_answer(calls.size(), -1), team_at_answer(calls.size(), -1);
    for (size_t i = 0; i < calls.size(); ++i) {
      auto record = std::move(calls[i]->raw->finish);
      calls[i]->raw->finish = [&, i, record = std::move(record)](const absl::Status& s) {
        running_at_answer[i] = (*shares)->held().running;
        team_at_answer[i] = omp_get_num_threads();
        record(s);
      };
    }
    (*executor)->Run("layer", Batch(calls, absl::Now()));
    for (size_t i = 0; i < calls.size(); ++i) {
      ASSERT_TRUE(calls[i]->status->ok()) << *calls[i]->status;
      EXPECT_EQ(running_at_answer[i], others + 1) << "call " << i << ", other batches " << others;
      EXPECT_EQ(team_at_answer[i], others == 0 ? 2 : 1) << "call " << i << ", other batches " << others;
      outputs[others].push_back(calls[i]->answer.output.values);
    }
    EXPECT_EQ((*shares)->held().running, others) << "the batch's share is released once it is answered";
  }
  for (size_t i = 0; i < outputs[0].size(); ++i) EXPECT_LE(testing::MaxAbsDiff(outputs[0][i], outputs[1][i]), 1e-6);
}

// A call cancelled, and one whose deadline passes, while the batch computes: each stops at its next query
// block with its own code; the other call of the batch is answered exactly.
TEST(BatchExecutorTest, StopsWhileComputingAtTheNextBlock) {
  testing::FakeClock clock;
  auto executor = BatchExecutor::Create({nullptr, &clock, 1});
  ASSERT_TRUE(executor.ok());
  const auto layer = Version(5, 1);
  std::mt19937_64 rng(6);
  const absl::Time arrival = clock.Now();
  std::vector<std::unique_ptr<TestCall>> calls;
  // L=1024, E=32, H=4: four query blocks of 256 rows (4 MiB of scores each).
  calls.push_back(MakeCall(layer, rng, 1, 1024, arrival));
  calls.push_back(MakeCall(layer, rng, 1, 1024, arrival));
  calls.push_back(MakeCall(layer, rng, 1, 7, arrival));
  auto asked = std::make_shared<std::atomic<int>>(0);
  calls[0]->raw->is_cancelled = [asked] { return ++*asked > 2; };  // before compute, block 1: no; block 2: yes
  calls[1]->raw->deadline = arrival + absl::Microseconds(1'500);
  calls[1]->raw->is_cancelled = [&clock] {  // each check moves time 1 ms: past the deadline at block 2
    clock.Advance(absl::Milliseconds(1));
    return false;
  };
  (*executor)->Run("layer", Batch(calls, arrival));
  EXPECT_EQ(*calls[0]->status, absl::CancelledError("request cancelled while computing"));
  EXPECT_EQ(asked->load(), 3);
  EXPECT_EQ(*calls[1]->status, absl::DeadlineExceededError("deadline passed while computing"));
  ASSERT_TRUE(calls[2]->status->ok()) << *calls[2]->status;
  auto alone = layer->engine->Forward(calls[2]->inputs, 1);
  EXPECT_LE(testing::MaxAbsDiff(calls[2]->answer.output.values, alone->output.values), 1e-6);
}

// Makes `call`'s cancellation check throw `fault` from its second ask on: the first is the executor's, before the
// batch computes; the later ones are the engine's, between query blocks, where a fault inside the engine would
// surface.
template <typename Fault>
void FailInsideTheEngine(InferenceCall& call, Fault fault) {
  auto asked = std::make_shared<std::atomic<int>>(0);
  call.is_cancelled = [asked, fault] {
    if (++*asked > 1) throw fault;
    return false;
  };
}

// An exception inside the engine (std::bad_alloc, or any other) fails the call that caused it, with
// RESOURCE_EXHAUSTED or INTERNAL; the others of its batch, which it failed with it, run again alone and are
// answered exactly; the worker goes on to the next batch.
TEST(BatchExecutorTest, AnEngineExceptionFailsOnlyTheCallThatCausedIt) {
  testing::FakeClock clock;
  auto executor = BatchExecutor::Create({nullptr, &clock, 2});
  ASSERT_TRUE(executor.ok());
  const auto layer = Version(7, 1);
  std::mt19937_64 rng(8);
  for (const bool out_of_memory : {true, false}) {
    std::vector<std::unique_ptr<TestCall>> calls;
    calls.push_back(MakeCall(layer, rng, 1, 7, clock.Now()));
    calls.push_back(MakeCall(layer, rng, 1, 1024, clock.Now()));  // asked before each of its 4 query blocks
    calls.push_back(MakeCall(layer, rng, 2, 8, clock.Now()));
    if (out_of_memory) {
      FailInsideTheEngine(*calls[1]->raw, std::bad_alloc());
    } else {
      FailInsideTheEngine(*calls[1]->raw, std::runtime_error("injected fault"));
    }
    (*executor)->Run("layer", Batch(calls, clock.Now()));
    ASSERT_TRUE(calls[1]->status.has_value());
    EXPECT_EQ(*calls[1]->status, out_of_memory ? absl::ResourceExhaustedError("out of memory while computing the batch")
                                               : absl::InternalError("engine failure: injected fault"));
    for (int i : {0, 2}) {
      ASSERT_TRUE(calls[i]->status.has_value());
      ASSERT_TRUE(calls[i]->status->ok()) << *calls[i]->status;
      auto alone = layer->engine->Forward(calls[i]->inputs, 1);
      EXPECT_LE(testing::MaxAbsDiff(calls[i]->answer.output.values, alone->output.values), 1e-6) << i;
    }
  }
}

// The same for a decoder layer's ragged batch: before, one request's exception failed all of them.
TEST(BatchExecutorTest, ADecoderExceptionFailsOnlyTheCallThatCausedIt) {
  testing::FakeClock clock;
  auto executor = BatchExecutor::Create({nullptr, &clock, 2});
  ASSERT_TRUE(executor.ok());
  v1::ServerConfig config;
  v1::LayerConfig& c = *config.add_layers();
  c.set_name("layer");
  c.set_embed_dim(kEmbed);
  c.set_num_heads(4);
  c.set_kind(v1::LayerConfig::DECODER_ATTENTION);
  c.mutable_decoder()->set_num_kv_heads(2);
  c.set_seed(9);
  ASSERT_TRUE(ApplyLayerDefaultsAndValidate(&c).ok());
  auto registry = LayerRegistry::Create(config);
  ASSERT_TRUE(registry.ok()) << registry.status();
  std::mt19937_64 rng(10);
  std::vector<std::unique_ptr<TestCall>> calls;
  for (int64_t len : {5, 64, 9}) {
    auto t = std::make_unique<TestCall>();
    t->query = testing::RandomValues(rng, len * kEmbed);
    InferenceCall& call = *t->call;
    call.layer_name = "layer";
    call.inputs.query = TensorView::F32(t->query.data(), {1, len, kEmbed});
    call.arrival = clock.Now();
    ASSERT_TRUE(ValidateCall(**registry, &call).ok());
    t->layer = call.layer;
    TestCall* self = t.get();
    call.finish = [self](const absl::Status& s) {
      self->status = s;
      if (s.ok()) self->answer = self->raw->outputs;
    };
    calls.push_back(std::move(t));
  }
  FailInsideTheEngine(*calls[1]->raw, std::runtime_error("injected fault"));
  std::vector<DecoderInputs> inputs;
  for (const auto& t : calls) inputs.push_back(t->raw->decoder_inputs);
  (*executor)->Run("layer", Batch(calls, clock.Now()));
  ASSERT_TRUE(calls[1]->status.has_value());
  EXPECT_EQ(*calls[1]->status, absl::InternalError("engine failure: injected fault"));
  for (int i : {0, 2}) {
    ASSERT_TRUE(calls[i]->status.has_value());
    ASSERT_TRUE(calls[i]->status->ok()) << *calls[i]->status;
    auto alone = calls[i]->layer->decoder->Forward(inputs[i], 1);
    ASSERT_TRUE(alone.ok());
    EXPECT_LE(testing::MaxAbsDiff(calls[i]->answer.output.values, alone->output.values), 1e-6) << i;
  }
}

}  // namespace
}  // namespace attnserve
