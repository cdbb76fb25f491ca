// The gRPC API of a whole server in this process (attnserve::Server on ephemeral loopback ports, through
// tests/testing/server_harness.h): every numeric answer is checked against the same layer built alone, every
// error against the code and message it must carry, and the metrics against exact counts. What needs the
// attnserve binary itself (signals, flags, a real Prometheus) is in tests/integration/server_test.cc.
//
// Loops are bounded in count, not in wall time, and small: these tests also run under ThreadSanitizer.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/descriptor.pb.h"
#include "google/protobuf/message.h"
#include "google/protobuf/text_format.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_mha.h"
#include "grpc_health_v1.grpc.pb.h"
#include "server/api/served_rpc.h"
#include "tests/testing/server_harness.h"

namespace attnserve::testing {
namespace {

using ::testing::HasSubstr;

[[maybe_unused]] ::testing::Environment* const kQuietLogs = ::testing::AddGlobalTestEnvironment(new QuietServerLogs);

class AttentionServiceTest : public ::testing::Test {
 protected:
  // Starts an in-process server (StartInProcessServer) owned by the test; fails the test on error.
  TestServer* Start(const std::string& config_pbtxt = "") {
    absl::StatusOr<std::unique_ptr<TestServer>> server = StartInProcessServer(config_pbtxt);
    if (!server.ok()) {
      ADD_FAILURE() << "cannot start the server: " << server.status();
      return nullptr;
    }
    server_ = std::move(*server);
    return server_.get();
  }

  std::unique_ptr<TestServer> server_;
};

#define START_OR_RETURN(var, ...)       \
  TestServer* var = Start(__VA_ARGS__); \
  ASSERT_NE(var, nullptr)

// ---------------------------------------------------------------------------------------------------
// Clients.

// One request of a client's sequence: good, with its reference answer, or malformed, with the error it must
// get.
struct Item {
  v1::InferRequest proto;
  bool good = true;
  AttentionOutputs want;  // good
  bool need_weights = false;
  BadRequest bad;  // !good (bad.request == proto)
};
using Work = std::vector<std::vector<Item>>;  // per client

Item GoodItem(const HostRequest& request, const MultiheadAttention& engine) {
  Item item;
  item.proto = request.ToProto();
  item.want = Expected(engine, request);
  item.need_weights = request.need_weights;
  return item;
}

Item BadItem(BadRequest bad) {
  Item item;
  item.good = false;
  item.proto = bad.request;
  item.bad = std::move(bad);
  return item;
}

// "" when the answer to `item` is right; what is wrong otherwise.
std::string CheckAnswer(const Item& item, const grpc::Status& status, const v1::InferResponse& response) {
  if (!item.good) return CheckBadStatus(item.bad, status.error_code(), status.error_message());
  if (!status.ok()) return absl::StrCat(item.proto.id(), ": ", Str(status));
  if (auto m = Matches(response, item.want, item.need_weights); !m) {
    return absl::StrCat(item.proto.id(), ": ", m.message());
  }
  return "";
}

// Every client sends its items in order, one unary Infer at a time, all clients at once.
void RunClients(v1::AttentionService::Stub& stub, const Work& work, Failures* failures) {
  std::vector<std::thread> clients;
  for (const std::vector<Item>& items : work) {
    clients.emplace_back([&stub, &items, failures] {
      for (const Item& item : items) {
        grpc::ClientContext ctx;
        ctx.set_deadline(In(absl::Seconds(60)));
        v1::InferResponse response;
        const grpc::Status status = stub.Infer(&ctx, item.proto, &response);
        if (std::string e = CheckAnswer(item, status, response); !e.empty()) failures->Add(e);
      }
    });
  }
  for (std::thread& t : clients) t.join();
}

// An Infer made with the callback API; `done` is notified once it returned.
struct AsyncCall {
  grpc::ClientContext ctx;
  v1::InferRequest request;
  v1::InferResponse response;
  grpc::Status status;
  absl::Time returned;
  absl::Notification done;
};

void StartCall(v1::AttentionService::Stub& stub, AsyncCall* call) {
  stub.async()->Infer(&call->ctx, &call->request, &call->response, [call](grpc::Status status) {
    call->status = std::move(status);
    call->returned = absl::Now();
    call->done.Notify();
  });
}

// Waits for every call to return. Past `timeout` that is a test failure, and the rest are cancelled (their
// callbacks then run promptly).
void AwaitAll(const std::vector<AsyncCall*>& calls, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  int returned = 0;
  for (AsyncCall* call : calls) returned += call->done.WaitForNotificationWithDeadline(deadline) ? 1 : 0;
  if (returned < static_cast<int>(calls.size())) {
    ADD_FAILURE() << "only " << returned << " of " << calls.size() << " calls returned within " << timeout;
    for (AsyncCall* call : calls) call->ctx.TryCancel();
  }
  for (AsyncCall* call : calls) call->done.WaitForNotification();
}

// ---------------------------------------------------------------------------------------------------
// a. Infer's answers equal the engine's.

struct InferCase {
  std::string what;
  HostRequest request;
  Encoding encoding;
};

std::vector<InferCase> InferCases(std::mt19937_64& rng) {
  std::vector<InferCase> cases;
  HostRequest batched = SelfAttention(rng, "small", 256, 2, 5);
  batched.key_padding_mask = RandomBoolMask(rng, {2, 5});
  batched.need_weights = true;
  batched.id = "batched-raw";
  cases.push_back({"[2,5,256] raw_data + bool key_padding_mask + need_weights", batched, Encoding::kRaw});
  batched.id = "batched-float";
  cases.push_back({"the same in float_data / bool_data", batched, Encoding::kRepeated});

  HostRequest unbatched = SelfAttention(rng, "small", 256, 0, 7);
  unbatched.need_weights = true;
  unbatched.id = "unbatched";
  cases.push_back({"unbatched [7,256] + need_weights", unbatched, Encoding::kRaw});

  HostRequest cross = SelfAttention(rng, "small", 256, 2, 5);
  cross.key = RandomF32(rng, {2, 9, 256});
  cross.value = RandomF32(rng, {2, 9, 256});
  cross.key_padding_mask = RandomBoolMask(rng, {2, 9});
  cross.need_weights = true;
  cross.average_attn_weights = false;
  cross.id = "cross";
  cases.push_back({"cross-attention key/value [2,9,256], per-head weights", cross, Encoding::kRaw});
  return cases;
}

TEST_F(AttentionServiceTest, InferEqualsEngine) {
  START_OR_RETURN(server);
  std::mt19937_64 rng(11);
  for (const InferCase& c : InferCases(rng)) {
    SCOPED_TRACE(c.what);
    const AttentionOutputs want = Expected(Small(), c.request);
    grpc::ClientContext ctx;
    ctx.set_deadline(In(absl::Seconds(30)));
    v1::InferResponse response;
    const grpc::Status status = server->stub->Infer(&ctx, c.request.ToProto(c.encoding), &response);
    ASSERT_TRUE(status.ok()) << Str(status);
    EXPECT_EQ(response.id(), c.request.id);
    EXPECT_TRUE(Matches(response, want, c.request.need_weights));
    ASSERT_TRUE(response.has_timing());
    EXPECT_GE(response.timing().batch_size(), 1);
    EXPECT_GT(response.timing().compute_us(), 0);
    EXPECT_GE(response.timing().queue_us(), 0);
  }
}

// ---------------------------------------------------------------------------------------------------
// b. Concurrent clients: every answer right, batching visible in the metrics.

// What the requests of ConcurrentWork add up to on the server.
struct Totals {
  int requests = 0;
  int64_t tokens = 0;
  double flops = 0;
};

Work ConcurrentWork(int clients, int per_client, Totals* totals) {
  Work work(clients);
  const MhaConfig config = Small().config();
  for (int c = 0; c < clients; ++c) {
    std::mt19937_64 rng(1000 + c);
    std::uniform_int_distribution<int64_t> len(4, 32);
    for (int i = 0; i < per_client; ++i) {
      const int64_t batch = (i % 3 == 0) ? 2 : 1;
      const int64_t l = len(rng);
      HostRequest r = SelfAttention(rng, "small", 256, batch, l);
      r.id = absl::StrCat(c, "/", i);
      r.need_weights = i % 2 == 0;
      work[c].push_back(GoodItem(r, Small()));
      ++totals->requests;
      totals->tokens += batch * l;
      totals->flops += static_cast<double>(AttentionFlops(config, batch, l, l));
    }
  }
  return work;
}

void CheckBatchMetrics(const std::string& text, const Totals& totals) {
  const Labels small = {{"layer", "small"}};
  EXPECT_EQ(MetricValue(text, "attnserve_requests_total", {{"layer", "small"}, {"code", "OK"}}),
            std::optional<double>(totals.requests))
      << MetricLines(text, "attnserve_requests_total");
  const std::optional<double> batch_sum = MetricValue(text, "attnserve_batch_size_sum", small);
  const std::optional<double> batch_count = MetricValue(text, "attnserve_batch_size_count", small);
  ASSERT_TRUE(batch_sum.has_value() && batch_count.has_value()) << MetricLines(text, "attnserve_batch_size");
  EXPECT_EQ(*batch_sum, totals.requests) << "every request ran in exactly one batch";
  EXPECT_GT(*batch_sum, *batch_count) << "no batch held more than one request:\n"
                                      << MetricLines(text, "attnserve_batch_size");
  std::printf("batches: %.0f for %.0f requests (mean %.2f per batch)\n", *batch_count, *batch_sum,
              *batch_sum / *batch_count);
  EXPECT_EQ(MetricValue(text, "attnserve_batch_tokens_sum", small), std::optional<double>(totals.tokens));
  const std::optional<double> flops = MetricValue(text, "attnserve_flops_total", small);
  ASSERT_TRUE(flops.has_value());
  EXPECT_NEAR(*flops, totals.flops, totals.flops * 1e-9);
  EXPECT_EQ(MetricValue(text, "attnserve_queue_duration_seconds_count", small), std::optional<double>(totals.requests));
  EXPECT_EQ(MetricValue(text, "attnserve_request_duration_seconds_count", small),
            std::optional<double>(totals.requests));
  EXPECT_EQ(MetricValue(text, "attnserve_compute_duration_seconds_count", small), batch_count);
  EXPECT_EQ(MetricValue(text, "attnserve_inflight_requests"), std::optional<double>(0));
  for (const char* family :
       {"attnserve_flops_total", "attnserve_queue_duration_seconds", "attnserve_compute_duration_seconds",
        "attnserve_batch_tokens", "attnserve_queue_depth", "attnserve_inflight_requests",
        "attnserve_request_duration_seconds", "attnserve_batch_size", "attnserve_requests_total"}) {
    EXPECT_THAT(text, HasSubstr(absl::StrCat("# TYPE ", family, " "))) << family;
  }
  EXPECT_TRUE(MetricValue(text, "attnserve_queue_depth", small).has_value());
}

TEST_F(AttentionServiceTest, ConcurrentClientsAreBatchedAndCorrect) {
  START_OR_RETURN(server);
  // 16 clients: enough concurrency that requests meet in the queue while a batch computes.
  Totals totals;
  const Work work = ConcurrentWork(/*clients=*/16, /*per_client=*/25, &totals);
  Failures failures;
  const absl::Time start = absl::Now();
  RunClients(*server->stub, work, &failures);
  std::printf("%d requests from %zu clients answered in %s\n", totals.requests, work.size(),
              absl::FormatDuration(absl::Now() - start).c_str());
  EXPECT_EQ(failures.count(), 0) << failures.Summary();

  // Every answer is counted before it is sent, so the metrics are final now.
  absl::StatusOr<std::string> text = server->Metrics();
  ASSERT_TRUE(text.ok()) << text.status();
  CheckBatchMetrics(*text, totals);
}

// ---------------------------------------------------------------------------------------------------
// c. Overload: a tiny queue turns the excess away with RESOURCE_EXHAUSTED; what runs is right.

TEST_F(AttentionServiceTest, OverloadGetsResourceExhausted) {
  START_OR_RETURN(server, R"pb(
    worker_threads: 1
    layers {
      name: "wide"
      embed_dim: 512
      num_heads: 8
      seed: 3
      batching { max_batch_size: 2 max_queue_size: 4 }
    }
  )pb");
  constexpr int kRequests = 64;
  constexpr int kDistinct = 4;
  std::mt19937_64 rng(21);
  std::vector<HostRequest> distinct;
  std::vector<AttentionOutputs> wants;
  for (int i = 0; i < kDistinct; ++i) {
    distinct.push_back(SelfAttention(rng, "wide", 512, 1, 64));
    wants.push_back(Expected(Engine(512, 8, 3), distinct.back()));
  }
  std::vector<std::unique_ptr<AsyncCall>> calls;
  std::vector<AsyncCall*> pending;
  for (int i = 0; i < kRequests; ++i) {  // all at once: far more than 2 running + 4 queued
    calls.push_back(std::make_unique<AsyncCall>());
    calls.back()->request = distinct[i % kDistinct].ToProto();
    calls.back()->request.set_id(absl::StrCat(i));
    calls.back()->ctx.set_deadline(In(absl::Seconds(300)));  // generous: ThreadSanitizer runs it too
    pending.push_back(calls.back().get());
    StartCall(*server->stub, calls.back().get());
  }
  AwaitAll(pending, absl::Seconds(330));

  int ok = 0, exhausted = 0;
  for (int i = 0; i < kRequests; ++i) {
    const AsyncCall& c = *calls[i];
    if (c.status.ok()) {
      ++ok;
      EXPECT_TRUE(Matches(c.response, wants[i % kDistinct], false)) << "request " << i;
    } else if (c.status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      ++exhausted;
      EXPECT_THAT(c.status.error_message(), HasSubstr("queue")) << "request " << i;
    } else {
      ADD_FAILURE() << "request " << i << ": unexpected " << Str(c.status);
    }
  }
  std::printf("%d OK, %d RESOURCE_EXHAUSTED of %d\n", ok, exhausted, kRequests);
  EXPECT_GE(exhausted, 1);
  EXPECT_GE(ok, 1);
  EXPECT_EQ(ok + exhausted, kRequests);

  absl::StatusOr<std::string> text = server->Metrics();
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(MetricValue(*text, "attnserve_requests_total", {{"layer", "wide"}, {"code", "RESOURCE_EXHAUSTED"}}),
            std::optional<double>(exhausted))
      << MetricLines(*text, "attnserve_requests_total");
}

// ---------------------------------------------------------------------------------------------------
// d. A request whose deadline passes, and one that is cancelled, while they wait in the queue.

TEST_F(AttentionServiceTest, DeadlineAndCancellationWhileQueued) {
  // A 4 s batching delay holds both calls in the queue (one batch) while the first one's deadline passes
  // and the second is cancelled. The deadline, 1 s, leaves time to reach the queue under TSan.
  START_OR_RETURN(server, R"pb(
    layers {
      name: "slow"
      embed_dim: 64
      num_heads: 2
      seed: 4
      batching { max_batch_size: 64 max_queue_delay_us: 4000000 }
    }
  )pb");
  const std::shared_ptr<prometheus::Registry> registry = server->server->metrics().registry();
  auto code_count = [&](const char* code) {
    return CollectedValue(*registry, "attnserve_requests_total", {{"layer", "slow"}, {"version", "1"}, {"code", code}})
        .value_or(0);
  };
  std::mt19937_64 rng(31);
  AsyncCall expiring, cancelled;
  expiring.request = cancelled.request = SelfAttention(rng, "slow", 64, 1, 8).ToProto();
  expiring.ctx.set_deadline(In(absl::Seconds(1)));
  cancelled.ctx.set_deadline(In(absl::Seconds(30)));
  const absl::Time sent = absl::Now();
  StartCall(*server->stub, &expiring);
  StartCall(*server->stub, &cancelled);

  const bool queued = WaitFor(
      [&] {
        return CollectedValue(*registry, "attnserve_queue_depth", {{"layer", "slow"}}) == 2.0;
      },
      absl::Seconds(10));
  EXPECT_TRUE(queued) << "the two calls never waited in the queue together:\n"
                      << SeriesToString(CollectSeries(*registry, "attnserve_queue_depth"));
  cancelled.ctx.TryCancel();
  AwaitAll({&expiring, &cancelled}, absl::Seconds(10));
  EXPECT_EQ(expiring.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << Str(expiring.status);
  EXPECT_LT(expiring.returned - sent, absl::Seconds(3)) << "the client's deadline did not end the call";
  EXPECT_EQ(cancelled.status.error_code(), grpc::StatusCode::CANCELLED) << Str(cancelled.status);

  // The server answers both when the batch closes, without computing either.
  const bool answered =
      WaitFor([&] { return code_count("DEADLINE_EXCEEDED") + code_count("CANCELLED") == 2; }, absl::Seconds(10));
  std::printf("server answered both after %s\n", absl::FormatDuration(absl::Now() - sent).c_str());
  absl::StatusOr<std::string> text = server->Metrics();
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_TRUE(answered) << MetricLines(*text, "attnserve_requests_total");
  EXPECT_EQ(code_count("DEADLINE_EXCEEDED"), 1) << MetricLines(*text, "attnserve_requests_total");
  EXPECT_EQ(code_count("CANCELLED"), 1) << MetricLines(*text, "attnserve_requests_total");
  EXPECT_EQ(code_count("OK"), 0) << MetricLines(*text, "attnserve_requests_total");
  EXPECT_EQ(MetricValue(*text, "attnserve_compute_duration_seconds_count", {{"layer", "slow"}}),
            std::optional<double>(0))
      << "a request nobody waits for any more was computed";
  EXPECT_EQ(MetricValue(*text, "attnserve_inflight_requests"), std::optional<double>(0));
}

// ---------------------------------------------------------------------------------------------------
// e. Malformed requests mixed into a busy stream of good ones.

// Every third item of each client malformed (of every kind in turn), the others good on "small".
Work MixedWork(int clients, int per_client) {
  Work work(clients);
  for (int c = 0; c < clients; ++c) {
    std::mt19937_64 rng(2000 + c);
    std::uniform_int_distribution<int64_t> len(4, 32);
    for (int i = 0; i < per_client; ++i) {
      const std::string id = absl::StrCat(c, "/", i);
      if (i % 3 == 1) {
        work[c].push_back(BadItem(MakeBad(kAllBad[(c + i) % std::size(kAllBad)], rng, id)));
        continue;
      }
      HostRequest r = SelfAttention(rng, "small", 256, 1, len(rng));
      r.id = id;
      if (i % 2 == 0) r.key_padding_mask = RandomBoolMask(rng, {1, r.query.shape[1]});
      work[c].push_back(GoodItem(r, Small()));
    }
  }
  return work;
}

TEST_F(AttentionServiceTest, MalformedRequestsAmongGoodOnes) {
  START_OR_RETURN(server);
  constexpr int kClients = 8;
  constexpr int kPerClient = 24;
  Failures failures;
  RunClients(*server->stub, MixedWork(kClients, kPerClient), &failures);
  EXPECT_EQ(failures.count(), 0) << failures.Summary();

  absl::StatusOr<std::string> text = server->Metrics();
  ASSERT_TRUE(text.ok()) << text.status();
  const int bad_total = kClients * (kPerClient / 3);
  const double invalid =
      MetricValue(*text, "attnserve_requests_total", {{"layer", "small"}, {"code", "INVALID_ARGUMENT"}}).value_or(0);
  const double not_found =
      MetricValue(*text, "attnserve_requests_total", {{"layer", "<unknown>"}, {"code", "NOT_FOUND"}}).value_or(0);
  EXPECT_EQ(invalid + not_found, bad_total) << MetricLines(*text, "attnserve_requests_total");
  EXPECT_EQ(MetricValue(*text, "attnserve_requests_total", {{"layer", "small"}, {"code", "OK"}}),
            std::optional<double>(kClients * kPerClient - bad_total));
}

// ---------------------------------------------------------------------------------------------------
// f. InferStream: answers matched by id, errors in the response, the stream ends OK.

// Checks a stream's answers to `items` (unique ids): each answered exactly once, rightly.
void CheckStreamAnswers(const std::vector<Item>& items, const std::vector<v1::InferResponse>& responses) {
  std::map<std::string, const Item*> by_id;
  for (const Item& item : items) by_id[item.proto.id()] = &item;
  std::map<std::string, int> seen;
  for (const v1::InferResponse& response : responses) {
    const std::string& id = response.id();
    ++seen[id];
    auto it = by_id.find(id);
    if (it == by_id.end()) {
      ADD_FAILURE() << "response with unknown id '" << id << "'";
      continue;
    }
    const Item& item = *it->second;
    if (item.good) {
      EXPECT_TRUE(Matches(response, item.want, item.need_weights)) << "id " << id;
      continue;
    }
    ASSERT_TRUE(response.has_error()) << "id " << id << " was malformed but got an answer";
    EXPECT_EQ(
        CheckBadStatus(item.bad, static_cast<grpc::StatusCode>(response.error().code()), response.error().message()),
        "");
    EXPECT_FALSE(response.has_output()) << "id " << id;
  }
  EXPECT_EQ(responses.size(), items.size());
  for (const Item& item : items) EXPECT_EQ(seen[item.proto.id()], 1) << "id " << item.proto.id();
}

TEST_F(AttentionServiceTest, InferStreamMatchesById) {
  START_OR_RETURN(server);
  constexpr int kRequests = 50;
  std::mt19937_64 rng(41);
  std::uniform_int_distribution<int64_t> len(4, 32);
  std::vector<Item> items;
  for (int i = 0; i < kRequests; ++i) {
    const std::string id = absl::StrCat("s", i);
    if (i % 4 == 3) {
      items.push_back(BadItem(MakeBad(kAllBad[(i / 4) % std::size(kAllBad)], rng, id)));
      continue;
    }
    HostRequest r = SelfAttention(rng, "small", 256, 1 + i % 2, len(rng));
    r.id = id;
    items.push_back(GoodItem(r, Small()));
  }
  std::vector<v1::InferRequest> requests;
  for (const Item& item : items) requests.push_back(item.proto);
  std::vector<v1::InferResponse> responses;
  const grpc::Status status = RunStream(*server->stub, requests, absl::Seconds(300), &responses);
  EXPECT_TRUE(status.ok()) << Str(status);
  CheckStreamAnswers(items, responses);
}

// An answer past the layer's max_response_bytes is refused before it is computed, with a message naming
// need_weights and the sizes; on a stream only that request fails, and the stream goes on.
TEST_F(AttentionServiceTest, OversizeAnswerFailsOnlyItsRequest) {
  START_OR_RETURN(server);
  std::mt19937_64 rng(43);
  // [1, 4096, 256] with averaged weights: 64 MiB of attn_weights, past the default 32 MiB.
  HostRequest huge = SelfAttention(rng, "small", 256, 1, 4096);
  huge.need_weights = true;
  huge.id = "huge";
  grpc::ClientContext ctx;
  v1::InferResponse resp;
  const grpc::Status unary = server->stub->Infer(&ctx, huge.ToProto(), &resp);
  EXPECT_EQ(unary.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << Str(unary);
  EXPECT_THAT(unary.error_message(),
              HasSubstr("need_weights: the answer would be 71303168 bytes (output [1, 4096, 256] is 4194304 "
                        "bytes, attn_weights [1, 4096, 4096] with average_attn_weights=true is 67108864 bytes), "
                        "past the layer's max_response_bytes of 33554432"));
  std::vector<Item> items;
  for (int i = 0; i < 6; ++i) {
    HostRequest r = SelfAttention(rng, "small", 256, 1, 8 + i);
    r.id = absl::StrCat("ok", i);
    items.push_back(GoodItem(r, Small()));
  }
  std::vector<v1::InferRequest> requests;
  for (const Item& item : items) requests.push_back(item.proto);
  requests.insert(requests.begin() + 3, huge.ToProto());
  std::vector<v1::InferResponse> responses;
  ASSERT_TRUE(RunStream(*server->stub, requests, absl::Seconds(300), &responses).ok());
  ASSERT_EQ(responses.size(), requests.size());
  int refused = 0;
  for (const v1::InferResponse& r : responses) {
    if (r.id() != "huge") continue;
    ++refused;
    EXPECT_EQ(r.error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
    EXPECT_THAT(r.error().message(), HasSubstr("max_response_bytes"));
  }
  EXPECT_EQ(refused, 1);
  responses.erase(std::remove_if(responses.begin(), responses.end(),
                                 [](const v1::InferResponse& r) { return r.id() == "huge"; }),
                  responses.end());
  CheckStreamAnswers(items, responses);
}

// ---------------------------------------------------------------------------------------------------
// g. Draining: while clients send, StopAccepting and Drain answer every call OK (and right) or refuse it.

// The state of a drained server: nothing queued, running or in flight, and every OK a client saw counted.
void CheckDrainedMetrics(const prometheus::Registry& registry, int ok) {
  EXPECT_EQ(CollectedValue(registry, "attnserve_inflight_requests"), std::optional<double>(0));
  EXPECT_EQ(CollectedValue(registry, "attnserve_inflight_batches"), std::optional<double>(0));
  EXPECT_EQ(CollectedValue(registry, "attnserve_queue_depth", {{"layer", "small"}}), std::optional<double>(0));
  EXPECT_EQ(
      CollectedValue(registry, "attnserve_requests_total", {{"layer", "small"}, {"version", "1"}, {"code", "OK"}}),
      std::optional<double>(ok))
      << SeriesToString(CollectSeries(registry, "attnserve_requests_total"));
}

TEST_F(AttentionServiceTest, DrainAnswersOrRefusesEveryCall) {
  START_OR_RETURN(server);
  constexpr int kClients = 8;
  constexpr int kPerClient = 50;
  std::mt19937_64 rng(51);
  std::vector<v1::InferRequest> requests;
  std::vector<AttentionOutputs> wants;
  for (int i = 0; i < 4; ++i) {
    HostRequest r = SelfAttention(rng, "small", 256, 1, 16);
    requests.push_back(r.ToProto());
    wants.push_back(Expected(Small(), r));
  }
  ClientsUntilRefused clients(server->stub.get(), &requests, &wants, kClients, kPerClient);
  // Some answers first, so that the drain meets load (each client has most of its requests left).
  ASSERT_TRUE(clients.AwaitAnswers(4 * kClients, absl::Seconds(60)))
      << "only " << clients.ok() << " answers before the drain; " << clients.failures().Summary();

  absl::Notification stopped, health_checked;
  absl::Status drained;
  absl::Duration drain_time;
  std::thread drainer([&] {
    server->server->StopAccepting();
    stopped.Notify();
    health_checked.WaitForNotification();  // Drain's gRPC shutdown would refuse the health check itself
    const absl::Time start = absl::Now();
    drained = server->server->Drain(start + absl::Seconds(30));
    drain_time = absl::Now() - start;
  });
  stopped.WaitForNotification();
  const std::string health = HealthStatus(server->channel, "");
  const std::string service_health = HealthStatus(server->channel, "attnserve.v1.AttentionService");
  health_checked.Notify();
  drainer.join();
  clients.Join();

  EXPECT_EQ(health, "NOT_SERVING");
  EXPECT_EQ(service_health, "NOT_SERVING");
  EXPECT_TRUE(drained.ok()) << drained;
  EXPECT_LT(drain_time, absl::Seconds(30));
  EXPECT_EQ(clients.failures().count(), 0) << clients.failures().Summary();
  EXPECT_EQ(clients.unavailable() + clients.cancelled(), kClients) << "every client ends on UNAVAILABLE or CANCELLED";
  CheckDrainedMetrics(*server->server->metrics().registry(), clients.ok());
  std::printf("drain: %d OK, then %d UNAVAILABLE and %d CANCELLED; Drain took %s\n", clients.ok(),
              clients.unavailable(), clients.cancelled(), absl::FormatDuration(drain_time).c_str());
}

// ---------------------------------------------------------------------------------------------------
// h. attnserve_requests_total counts every answered request once, by layer and code, unary and streamed.

// A request and the code it must get (and its answer when OK).
struct Planned {
  v1::InferRequest proto;
  grpc::StatusCode code = grpc::StatusCode::OK;
  AttentionOutputs want;
};

// OK on both layers; INVALID_ARGUMENT on both; NOT_FOUND for unknown names and a missing one.
std::vector<Planned> MixedOutcomes(std::mt19937_64& rng) {
  std::vector<Planned> plan;
  auto add = [&plan](HostRequest r, grpc::StatusCode code, const MultiheadAttention* engine) {
    r.id = absl::StrCat(plan.size());
    plan.push_back({r.ToProto(), code, engine != nullptr ? Expected(*engine, r) : AttentionOutputs{}});
  };
  for (int i = 0; i < 4; ++i) add(SelfAttention(rng, "small", 256, 1, 12), grpc::StatusCode::OK, &Small());
  for (int i = 0; i < 2; ++i) add(SelfAttention(rng, "base", 768, 1, 12), grpc::StatusCode::OK, &Base());
  for (Bad kind : kAllBad) {  // INVALID_ARGUMENT on "small", and NOT_FOUND
    BadRequest bad = MakeBad(kind, rng, absl::StrCat(plan.size()));
    plan.push_back({bad.request, bad.code, {}});
  }
  HostRequest wrong_dim = SelfAttention(rng, "base", 768, 1, 8);
  wrong_dim.query = RandomF32(rng, {1, 8, 767});
  add(wrong_dim, grpc::StatusCode::INVALID_ARGUMENT, nullptr);
  for (const char* name : {"nope", "also_nope", ""}) {
    add(SelfAttention(rng, name, 256, 1, 8), grpc::StatusCode::NOT_FOUND, nullptr);
  }
  return plan;
}

// The requests_total series `plan` adds: unknown (and missing) layer names are folded into "<unknown>", with
// no version; the others were answered by their layer's version 1.
void Count(const std::vector<Planned>& plan, std::map<Labels, double>* series) {
  for (const Planned& p : plan) {
    const bool unknown = p.code == grpc::StatusCode::NOT_FOUND;
    const std::string code = absl::StatusCodeToString(static_cast<absl::StatusCode>(p.code));
    (*series)[{{"code", code}, {"layer", unknown ? "<unknown>" : p.proto.layer()}, {"version", unknown ? "" : "1"}}] +=
        1;
  }
}

void SendUnary(v1::AttentionService::Stub& stub, const std::vector<Planned>& plan) {
  for (const Planned& p : plan) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(absl::Seconds(30)));
    v1::InferResponse response;
    const grpc::Status status = stub.Infer(&ctx, p.proto, &response);
    EXPECT_EQ(status.error_code(), p.code) << "unary id " << p.proto.id() << ": " << Str(status);
    if (status.ok()) {
      EXPECT_TRUE(Matches(response, p.want, false)) << "unary id " << p.proto.id();
    }
  }
}

void SendStream(v1::AttentionService::Stub& stub, const std::vector<Planned>& plan) {
  std::vector<v1::InferRequest> requests;
  for (const Planned& p : plan) requests.push_back(p.proto);
  std::vector<v1::InferResponse> responses;
  const grpc::Status status = RunStream(stub, requests, absl::Seconds(30), &responses);
  EXPECT_TRUE(status.ok()) << Str(status);
  EXPECT_EQ(responses.size(), plan.size());
  std::map<std::string, const Planned*> by_id;
  for (const Planned& p : plan) by_id[p.proto.id()] = &p;
  for (const v1::InferResponse& response : responses) {
    const Planned* p = by_id.count(response.id()) ? by_id[response.id()] : nullptr;
    ASSERT_NE(p, nullptr) << "response with unknown id '" << response.id() << "'";
    EXPECT_EQ(response.has_error() ? response.error().code() : 0, static_cast<int>(p->code))
        << "stream id " << response.id() << ": " << response.error().message();
    if (p->code == grpc::StatusCode::OK) {
      EXPECT_TRUE(Matches(response, p->want, false)) << "stream id " << response.id();
    }
  }
}

// Nothing queued, running or in flight. A batch's gauge drops after its answers were sent: waited for.
void CheckAtRest(const prometheus::Registry& registry) {
  const bool batches_done =
      WaitFor([&] { return CollectedValue(registry, "attnserve_inflight_batches") == 0.0; }, absl::Seconds(10));
  EXPECT_TRUE(batches_done) << SeriesToString(CollectSeries(registry, "attnserve_inflight_batches"));
  EXPECT_EQ(CollectedValue(registry, "attnserve_inflight_requests"), std::optional<double>(0));
  const std::map<Labels, double> depths = {{{{"layer", "base"}}, 0}, {{{"layer", "small"}}, 0}};
  EXPECT_EQ(CollectSeries(registry, "attnserve_queue_depth"), depths)
      << SeriesToString(CollectSeries(registry, "attnserve_queue_depth"));
}

TEST_F(AttentionServiceTest, RequestsTotalCountsEveryOutcome) {
  START_OR_RETURN(server);
  std::mt19937_64 rng(61);
  const std::vector<Planned> plan = MixedOutcomes(rng);
  SendUnary(*server->stub, plan);
  SendStream(*server->stub, plan);
  {
    grpc::ClientContext ctx;  // not an inference request: not counted
    v1::GetLayerRequest request;
    request.set_name("nope");
    v1::Layer layer;
    EXPECT_EQ(server->stub->GetLayer(&ctx, request, &layer).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  std::map<Labels, double> want;
  Count(plan, &want);
  Count(plan, &want);  // once unary, once streamed

  // Every answer is counted before it is sent: exact now, in the registry and on /metrics alike.
  const std::shared_ptr<prometheus::Registry> registry = server->server->metrics().registry();
  const std::map<Labels, double> got = CollectSeries(*registry, "attnserve_requests_total");
  EXPECT_EQ(got, want) << "collected:\n" << SeriesToString(got) << "expected:\n" << SeriesToString(want);
  absl::StatusOr<std::string> text = server->Metrics();
  ASSERT_TRUE(text.ok()) << text.status();
  for (const auto& [labels, value] : want) {
    EXPECT_EQ(MetricValue(*text, "attnserve_requests_total", labels), std::optional<double>(value))
        << SeriesToString({{labels, value}}) << MetricLines(*text, "attnserve_requests_total");
  }
  CheckAtRest(*registry);
}

// One unary call of `method` whose request is `bytes` as they are (parsed, or not, by the server).
grpc::Status RawUnaryCall(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                          const std::string& bytes) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(In(absl::Seconds(30)));
  const grpc::Slice slice(bytes);
  const grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  absl::Notification done;
  grpc::Status status;
  stub.UnaryCall(&ctx, method, grpc::StubOptions(), &request, &response, [&](grpc::Status s) {
    status = std::move(s);
    done.Notify();
  });
  done.WaitForNotification();
  return status;
}

// attnserve_grpc_calls_total sees the calls refused before the dispatcher, which attnserve_requests_total does
// not: a request that does not parse, an unknown method (under method="other", whatever its path). gRPC's own
// health service is not counted (api/served_rpc.h: counting it would take an interceptor on every stream).
TEST_F(AttentionServiceTest, GrpcCallsCountsRefusedCalls) {
  START_OR_RETURN(server);
  const std::string infer = "/attnserve.v1.AttentionService/Infer";
  std::mt19937_64 rng(62);
  std::string garbage(64, '\0');
  for (char& c : garbage) c = static_cast<char>(rng() | 0x80);  // never a valid tag and length
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(RawUnaryCall(server->channel, infer, garbage).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  const grpc::Status unknown = RawUnaryCall(server->channel, "/attnserve.v1.AttentionService/NoSuchMethod", "");
  EXPECT_EQ(unknown.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_EQ(unknown.error_message(), "method: this server has no method '/attnserve.v1.AttentionService/NoSuchMethod'");
  EXPECT_EQ(RawUnaryCall(server->channel, "/made.up.Service/" + std::string(200, 'x'), "").error_code(),
            grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_EQ(RawUnaryCall(server->channel, "/attnserve.v1.AttentionService/ListLayers", "").error_code(),
            grpc::StatusCode::OK);
  EXPECT_EQ(HealthStatus(server->channel, ""), "SERVING");

  const std::map<Labels, double> got =
      CollectSeries(*server->server->metrics().registry(), "attnserve_grpc_calls_total");
  auto count = [&](const std::string& method, const std::string& code) {
    const auto it = got.find(Labels{{"method", method}, {"code", code}});
    return it == got.end() ? 0.0 : it->second;
  };
  EXPECT_EQ(count("attnserve.v1.AttentionService/Infer", "INVALID_ARGUMENT"), 3) << SeriesToString(got);
  EXPECT_EQ(count("other", "UNIMPLEMENTED"), 2) << SeriesToString(got);
  EXPECT_EQ(count("attnserve.v1.AttentionService/ListLayers", "OK"), 1) << SeriesToString(got);
  EXPECT_EQ(got.size(), 3u) << "no other series: " << SeriesToString(got);
  // Not requests of a layer: attnserve_requests_total counts none of them.
  for (const auto& [labels, value] : CollectSeries(*server->server->metrics().registry(), "attnserve_requests_total")) {
    EXPECT_EQ(value, 0) << SeriesToString({{labels, value}});
  }
}

// Each handler counts its calls under its own method (a handler naming another method's path, or a path
// that is not one, would count under that one or under "other"): one call of every method of the three
// services, whatever it answers, makes exactly one call under each method's name.
TEST_F(AttentionServiceTest, EveryServedMethodCountsUnderItsOwnName) {
  START_OR_RETURN(server);
  const std::vector<std::string> paths = ServedMethodPaths(
      {"attnserve.v1.AttentionService", "inference.GRPCInferenceService", "attnserve.v1.SessionService"});
  ASSERT_EQ(paths.size(), 4u + 12u + 8u);
  for (const std::string& path : paths) RawUnaryCall(server->channel, path, "");
  std::map<std::string, double> by_method;
  for (int wait_ms = 0; wait_ms < 10000; wait_ms += 10) {  // layer changes finish on the control thread
    by_method.clear();
    for (const auto& [labels, value] :
         CollectSeries(*server->server->metrics().registry(), "attnserve_grpc_calls_total")) {
      by_method[labels.at("method")] += value;
    }
    if (by_method.size() >= paths.size()) break;
    absl::SleepFor(absl::Milliseconds(10));
  }
  for (const std::string& path : paths) EXPECT_EQ(by_method[path.substr(1)], 1) << path;
  EXPECT_EQ(by_method.count("other"), 0u);
  EXPECT_EQ(by_method.size(), paths.size());
}

// ---------------------------------------------------------------------------------------------------
// i. Health, reflection, ListLayers, GetLayer.

// Protobuf reflection on messages whose types are known only at run time (the reflection protocol's, below).
const google::protobuf::FieldDescriptor* FieldOf(const google::protobuf::Message& m, const std::string& name) {
  const google::protobuf::FieldDescriptor* field = m.GetDescriptor()->FindFieldByName(name);
  if (field == nullptr) {
    std::fprintf(stderr, "%s has no field '%s'\n", m.GetTypeName().c_str(), name.c_str());
    std::abort();
  }
  return field;
}
bool Has(const google::protobuf::Message& m, const std::string& field) {
  return m.GetReflection()->HasField(m, FieldOf(m, field));
}
const google::protobuf::Message& Sub(const google::protobuf::Message& m, const std::string& field) {
  return m.GetReflection()->GetMessage(m, FieldOf(m, field));
}
std::vector<std::string> Strings(const google::protobuf::Message& m, const std::string& field) {
  std::vector<std::string> out;
  const google::protobuf::FieldDescriptor* f = FieldOf(m, field);
  for (int i = 0; i < m.GetReflection()->FieldSize(m, f); ++i) {
    out.push_back(m.GetReflection()->GetRepeatedString(m, f, i));
  }
  return out;
}

// One bidi-streaming call of `method` carrying serialized messages, made blocking over a completion queue
// (gRPC's generic stub has no blocking streaming API).
class GenericStream {
 public:
  GenericStream(const std::shared_ptr<grpc::Channel>& channel, const std::string& method, absl::Duration timeout)
      : stub_(channel) {
    ctx_.set_deadline(In(timeout));
    call_ = stub_.PrepareCall(&ctx_, method, &cq_);
    call_->StartCall(this);
    Await();
  }
  ~GenericStream() {
    if (!finished_) {
      ctx_.TryCancel();
      Finish();
    }
    cq_.Shutdown();
    void* tag;
    bool ok;
    while (cq_.Next(&tag, &ok)) {
    }
  }
  bool Write(const google::protobuf::Message& message) {
    const grpc::Slice slice(message.SerializeAsString());
    const grpc::ByteBuffer buffer(&slice, 1);
    call_->Write(buffer, this);
    return Await();
  }
  bool Read(google::protobuf::Message* message) {
    grpc::ByteBuffer buffer;
    call_->Read(&buffer, this);
    grpc::Slice slice;
    return Await() && buffer.DumpToSingleSlice(&slice).ok() &&
           message->ParseFromArray(slice.begin(), static_cast<int>(slice.size()));
  }
  bool WritesDone() {
    call_->WritesDone(this);
    return Await();
  }
  grpc::Status Finish() {
    grpc::Status status;
    call_->Finish(&status, this);
    Await();
    finished_ = true;
    return status;
  }

 private:
  // One operation is in flight at a time: the next event is its completion.
  bool Await() {
    void* tag = nullptr;
    bool ok = false;
    return cq_.Next(&tag, &ok) && ok;
  }

  grpc::GenericStub stub_;
  grpc::ClientContext ctx_;
  grpc::CompletionQueue cq_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call_;
  bool finished_ = false;
};

// The reflection protocol's messages as gRPC's reflection library registered them in the generated pool:
// the test's own grpc.reflection.v1alpha stubs cannot share a process with that library (the same proto
// symbols twice abort protobuf at start-up).
std::unique_ptr<google::protobuf::Message> NewReflectionMessage(const std::string& name) {
  const google::protobuf::Descriptor* type =
      google::protobuf::DescriptorPool::generated_pool()->FindMessageTypeByName("grpc.reflection.v1alpha." + name);
  if (type == nullptr) return nullptr;
  return std::unique_ptr<google::protobuf::Message>(
      google::protobuf::MessageFactory::generated_factory()->GetPrototype(type)->New());
}

class ReflectionClient {
 public:
  explicit ReflectionClient(const std::shared_ptr<grpc::Channel>& channel)
      : stream_(channel, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", absl::Seconds(30)),
        request_(NewReflectionMessage("ServerReflectionRequest")),
        response_(NewReflectionMessage("ServerReflectionResponse")) {}

  bool ready() const { return request_ != nullptr && response_ != nullptr; }
  // Sends a ServerReflectionRequest given in text format; the response, or null when the exchange failed.
  const google::protobuf::Message* Ask(const std::string& request_text) {
    request_->Clear();
    if (!google::protobuf::TextFormat::ParseFromString(request_text, request_.get())) return nullptr;
    return stream_.Write(*request_) && stream_.Read(response_.get()) ? response_.get() : nullptr;
  }
  // Closes the stream: the server must end it OK, with no further message.
  grpc::Status Close() {
    if (!stream_.WritesDone()) return grpc::Status(grpc::StatusCode::INTERNAL, "WritesDone failed");
    if (stream_.Read(response_.get())) return grpc::Status(grpc::StatusCode::INTERNAL, "a message after WritesDone");
    return stream_.Finish();
  }

 private:
  GenericStream stream_;
  std::unique_ptr<google::protobuf::Message> request_, response_;
};

void CheckHealth(const std::shared_ptr<grpc::Channel>& channel) {
  EXPECT_EQ(HealthStatus(channel, ""), "SERVING");
  EXPECT_EQ(HealthStatus(channel, "attnserve.v1.AttentionService"), "SERVING");
  EXPECT_THAT(HealthStatus(channel, "no.such.Service"), ::testing::StartsWith("NOT_FOUND"));
}

void CheckListServices(ReflectionClient& reflection) {
  const google::protobuf::Message* response = reflection.Ask(R"pb(list_services: "")pb");
  ASSERT_NE(response, nullptr);
  ASSERT_TRUE(Has(*response, "list_services_response")) << response->DebugString();
  std::set<std::string> services;
  const google::protobuf::Message& list = Sub(*response, "list_services_response");
  const google::protobuf::FieldDescriptor* service = FieldOf(list, "service");
  for (int i = 0; i < list.GetReflection()->FieldSize(list, service); ++i) {
    const google::protobuf::Message& s = list.GetReflection()->GetRepeatedMessage(list, service, i);
    services.insert(s.GetReflection()->GetString(s, FieldOf(s, "name")));
  }
  EXPECT_EQ(services.count("attnserve.v1.AttentionService"), 1u) << absl::StrJoin(services, ", ");
  EXPECT_EQ(services.count("grpc.health.v1.Health"), 1u) << absl::StrJoin(services, ", ");
}

void CheckFileContainingSymbol(ReflectionClient& reflection) {
  const google::protobuf::Message* response =
      reflection.Ask(R"pb(file_containing_symbol: "attnserve.v1.AttentionService")pb");
  ASSERT_NE(response, nullptr);
  ASSERT_TRUE(Has(*response, "file_descriptor_response")) << response->DebugString();
  bool found = false;
  std::vector<std::string> names;
  for (const std::string& bytes : Strings(Sub(*response, "file_descriptor_response"), "file_descriptor_proto")) {
    google::protobuf::FileDescriptorProto file;
    ASSERT_TRUE(file.ParseFromString(bytes));
    names.push_back(file.name());
    if (file.name() != "attnserve/v1/attention.proto") continue;
    found = true;
    EXPECT_EQ(file.package(), "attnserve.v1");
    bool has_service = false;
    for (const auto& s : file.service()) has_service |= s.name() == "AttentionService";
    EXPECT_TRUE(has_service);
  }
  EXPECT_TRUE(found) << "files: " << absl::StrJoin(names, ", ");
  EXPECT_EQ(names.empty() ? "" : names.front(), "attnserve/v1/attention.proto");

  response = reflection.Ask(R"pb(file_containing_symbol: "no.such.Symbol")pb");
  ASSERT_NE(response, nullptr);
  ASSERT_TRUE(Has(*response, "error_response")) << response->DebugString();
  const google::protobuf::Message& error = Sub(*response, "error_response");
  EXPECT_EQ(error.GetReflection()->GetInt32(error, FieldOf(error, "error_code")),
            static_cast<int>(grpc::StatusCode::NOT_FOUND));
}

void CheckLayers(v1::AttentionService::Stub& stub) {
  {
    grpc::ClientContext ctx;
    v1::ListLayersResponse response;
    const grpc::Status status = stub.ListLayers(&ctx, v1::ListLayersRequest(), &response);
    ASSERT_TRUE(status.ok()) << Str(status);
    std::vector<std::string> names;
    for (const v1::Layer& l : response.layers()) {
      names.push_back(l.config().name());
      EXPECT_TRUE(l.ready()) << l.config().name();
    }
    EXPECT_EQ(names, (std::vector<std::string>{"small", "base"}));
  }
  grpc::ClientContext ctx;
  v1::GetLayerRequest request;
  request.set_name("base");
  v1::Layer layer;
  const grpc::Status status = stub.GetLayer(&ctx, request, &layer);
  ASSERT_TRUE(status.ok()) << Str(status);
  EXPECT_EQ(layer.config().name(), "base");
  EXPECT_EQ(layer.config().embed_dim(), 768);
  EXPECT_EQ(layer.config().num_heads(), 12);
  EXPECT_EQ(layer.config().kdim(), 768) << "defaults filled in";
  EXPECT_TRUE(layer.ready());

  grpc::ClientContext missing_ctx;
  request.set_name("nope");
  const grpc::Status missing = stub.GetLayer(&missing_ctx, request, &layer);
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::NOT_FOUND) << Str(missing);
  EXPECT_THAT(missing.error_message(), HasSubstr("nope"));
}

TEST_F(AttentionServiceTest, HealthReflectionAndLayers) {
  START_OR_RETURN(server);
  CheckHealth(server->channel);
  {
    ReflectionClient reflection(server->channel);
    ASSERT_TRUE(reflection.ready()) << "gRPC's reflection library registered no grpc.reflection.v1alpha messages";
    CheckListServices(reflection);
    CheckFileContainingSymbol(reflection);
    const grpc::Status closed = reflection.Close();
    EXPECT_TRUE(closed.ok()) << Str(closed);
  }
  CheckLayers(*server->stub);
}

}  // namespace
}  // namespace attnserve::testing
