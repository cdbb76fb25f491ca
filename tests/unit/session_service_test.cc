// attnserve.v1.SessionService's CreateSession with cross-attention memories, in a whole in-process server: such an
// open holds twice its request in the memory budget until the session is open, is refused before it queues for
// what the store can tell without projecting (a session id taken), waits for the one opener thread (refused at
// once past sessions.max_opens_waiting), and is answered when the server drains (OK once projected, UNAVAILABLE while
// it waited), so that the drain ends.
#include <grpcpp/grpcpp.h>

#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "attnserve/v1/session.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_mha.h"
#include "tests/testing/server_harness.h"

namespace attnserve::testing {
namespace {

[[maybe_unused]] ::testing::Environment* const kQuietLogs = ::testing::AddGlobalTestEnvironment(new QuietServerLogs);

// A memory [rows, dim] of random values.
v1::Tensor Memory(int64_t rows, int64_t dim, std::mt19937_64& rng) {
  const std::vector<float> values = RandomValues(rng, rows * dim);
  v1::Tensor t;
  t.add_shape(rows);
  t.add_shape(dim);
  t.set_dtype(v1::FLOAT32);
  t.set_raw_data(std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float)));
  return t;
}

v1::CreateSessionRequest OpenWith(const std::string& id, const std::string& layer, const v1::Tensor& memory) {
  v1::CreateSessionRequest create;
  create.set_session_id(id);
  create.add_layers(layer);
  (*create.mutable_memory())[layer] = memory;
  return create;
}

grpc::Status Create(v1::SessionService::Stub& sessions, const v1::CreateSessionRequest& create) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  v1::Session session;
  return sessions.CreateSession(&ctx, create, &session);
}

// `n` opens of `memory` on layer "base" at once (ids s0, s1, ...), each from its own thread; `on_answer` (may be
// empty) sees each status as it comes, one at a time.
class ConcurrentOpens {
 public:
  ConcurrentOpens(v1::SessionService::Stub& sessions, int n, const v1::Tensor& memory,
                  std::function<void(const grpc::Status&)> on_answer = nullptr)
      : on_answer_(std::move(on_answer)) {
    for (int i = 0; i < n; ++i) {
      threads_.emplace_back([this, &sessions, &memory, i] {
        const grpc::Status status = Create(sessions, OpenWith("s" + std::to_string(i), "base", memory));
        absl::MutexLock lock(&mu_);
        ++codes_[status.error_code()];
        if (on_answer_) on_answer_(status);
      });
    }
  }
  // Once every open is answered: how many got each code.
  std::map<grpc::StatusCode, int> Join() {
    for (std::thread& t : threads_) t.join();
    absl::MutexLock lock(&mu_);
    return codes_;
  }

 private:
  absl::Mutex mu_;
  std::map<grpc::StatusCode, int> codes_ ABSL_GUARDED_BY(mu_);
  const std::function<void(const grpc::Status&)> on_answer_;
  std::vector<std::thread> threads_;
};

// Under a 4 MiB budget, a [2000, 256] memory (a 2 MiB request) is refused: twice its request and a block of its
// projection (1 MiB) do not fit, where the request once would. [1000, 256] fits. An open the store refuses anyway
// (an id taken) is refused for that, even when it would not fit.
TEST(SessionServiceTest, AnOpenHoldsTwiceItsRequestInTheBudget) {
  absl::StatusOr<std::unique_ptr<TestServer>> server = StartInProcessServer(R"pb(
    memory_budget_bytes: 4194304
    layers { name: "small" embed_dim: 256 num_heads: 4 seed: 1 }
  )pb");
  ASSERT_TRUE(server.ok()) << server.status();
  auto sessions = v1::SessionService::NewStub((*server)->channel);
  std::mt19937_64 rng(3);
  const grpc::Status refused = Create(*sessions, OpenWith("big", "small", Memory(2000, 256, rng)));
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_NE(refused.error_message().find("memory budget"), std::string::npos) << refused.error_message();
  const grpc::Status opened = Create(*sessions, OpenWith("fits", "small", Memory(1000, 256, rng)));
  EXPECT_TRUE(opened.ok()) << opened.error_message();
  // The id is taken: refused before the budget is asked and before the open waits for its turn.
  const grpc::Status taken = Create(*sessions, OpenWith("fits", "small", Memory(2000, 256, rng)));
  EXPECT_EQ(taken.error_code(), grpc::StatusCode::ALREADY_EXISTS) << taken.error_message();
}

// Six opens of [4096, 768] memories at once (about 50 ms of projection each on 2 CPUs), the server drained
// once the first is answered: the drain ends in time, every open is answered, OK or UNAVAILABLE (waiting, or
// stopped at its next block).
TEST(SessionServiceTest, TheDrainAnswersEveryOpenWaitingOrRunning) {
  absl::StatusOr<std::unique_ptr<TestServer>> server = StartInProcessServer(R"pb(
    memory_budget_bytes: 1073741824
    sessions { kv_cache_bytes: 268435456 }
    layers { name: "base" embed_dim: 768 num_heads: 12 seed: 2 }
  )pb");
  ASSERT_TRUE(server.ok()) << server.status();
  auto sessions = v1::SessionService::NewStub((*server)->channel);
  std::mt19937_64 rng(4);
  const v1::Tensor memory = Memory(4096, 768, rng);
  constexpr int kOpens = 6;
  absl::Notification first_answered;
  ConcurrentOpens opens(*sessions, kOpens, memory, [&](const grpc::Status&) {
    if (!first_answered.HasBeenNotified()) first_answered.Notify();
  });
  first_answered.WaitForNotification();
  const absl::Status drained = (*server)->server->Drain(absl::Now() + absl::Seconds(60));
  std::map<grpc::StatusCode, int> codes = opens.Join();
  EXPECT_TRUE(drained.ok()) << drained;
  int answered = 0;
  for (const auto& [code, n] : codes) {
    // CANCELLED: gRPC's own shutdown, for an open whose request was still arriving when it came.
    EXPECT_TRUE(code == grpc::StatusCode::OK || code == grpc::StatusCode::UNAVAILABLE ||
                code == grpc::StatusCode::CANCELLED)
        << code << " x " << n;
    answered += n;
  }
  EXPECT_EQ(answered, kOpens);
  EXPECT_GE(codes[grpc::StatusCode::OK], 1);
  // The others need 5 x 50 ms more than the first: the drain stopped some of them.
  EXPECT_GE(codes[grpc::StatusCode::UNAVAILABLE], 1);
  std::printf("    %d opens, the drain after the first: %d OK, %d UNAVAILABLE\n", kOpens, codes[grpc::StatusCode::OK],
              codes[grpc::StatusCode::UNAVAILABLE]);
}

// sessions.max_opens_waiting 1: of ten [4096, 768] opens sent at once (about 50 ms of projection each), at most
// one runs and one waits at any time; the rest are refused at once, RESOURCE_EXHAUSTED naming the limit. Every
// open the opener took is OK, and the sessions open are those.
TEST(SessionServiceTest, PastMaxOpensWaitingAnOpenIsRefusedAtOnce) {
  absl::StatusOr<std::unique_ptr<TestServer>> server = StartInProcessServer(R"pb(
    memory_budget_bytes: 1073741824
    sessions { kv_cache_bytes: 536870912 max_opens_waiting: 1 }
    layers { name: "base" embed_dim: 768 num_heads: 12 seed: 2 }
  )pb");
  ASSERT_TRUE(server.ok()) << server.status();
  auto sessions = v1::SessionService::NewStub((*server)->channel);
  std::mt19937_64 rng(5);
  const v1::Tensor memory = Memory(4096, 768, rng);
  constexpr int kOpens = 10;
  std::vector<std::string> refusals;  // written by one open at a time, read once all are answered
  ConcurrentOpens opens(*sessions, kOpens, memory, [&](const grpc::Status& status) {
    if (!status.ok()) refusals.push_back(status.error_message());
  });
  std::map<grpc::StatusCode, int> codes = opens.Join();
  EXPECT_EQ(codes[grpc::StatusCode::OK] + codes[grpc::StatusCode::RESOURCE_EXHAUSTED], kOpens);
  EXPECT_GE(codes[grpc::StatusCode::OK], 1);
  EXPECT_GE(codes[grpc::StatusCode::RESOURCE_EXHAUSTED], 1);
  for (const std::string& message : refusals) {
    EXPECT_NE(message.find("1 sessions with memories are waiting to be opened already (sessions.max_opens_waiting)"),
              std::string::npos)
        << message;
  }
  v1::ListSessionsResponse listed;
  grpc::ClientContext ctx;
  ASSERT_TRUE(sessions->ListSessions(&ctx, v1::ListSessionsRequest(), &listed).ok());
  EXPECT_EQ(listed.sessions_size(), codes[grpc::StatusCode::OK]);
  std::printf("    %d opens at once, one may wait: %d OK, %d RESOURCE_EXHAUSTED\n", kOpens, codes[grpc::StatusCode::OK],
              codes[grpc::StatusCode::RESOURCE_EXHAUSTED]);
}

}  // namespace
}  // namespace attnserve::testing
