// Layers replaced, unloaded and loaded again on a running in-process Server while clients send Infer to it
// and to a steady layer: nothing accepted is lost, every answer is exact to the version that computed it,
// the steady layer never notices, and an unloaded version is freed once its last request is answered.
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "gtest/gtest.h"
#include "server/server.h"
#include "server/startup/server_config.h"
#include "tests/testing/metric_values.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

constexpr int64_t kEmbed = 32, kLen = 6;

v1::LayerConfig Layer(const std::string& name, uint64_t seed) {
  v1::LayerConfig c;
  c.set_name(name);
  c.set_embed_dim(kEmbed);
  c.set_num_heads(4);
  c.set_seed(seed);
  return c;
}

std::unique_ptr<Server> StartServer() {
  v1::ServerConfig config;
  config.set_grpc_address("127.0.0.1:0");
  config.set_metrics_address("127.0.0.1:0");
  *config.add_layers() = Layer("steady", 1);
  *config.add_layers() = Layer("churn", 10);
  // As the in-process harness: no memory guard, connection cap or reset-flood guard on the test process's own
  // sockets.
  config.mutable_transport()->set_memory_guard_interval_ms(-1);
  config.mutable_transport()->set_max_connections(-1);
  config.mutable_transport()->set_reset_flood_check_interval_ms(-1);
  EXPECT_TRUE(ApplyDefaultsAndValidate(&config).ok());
  ServerOptions options;
  options.cpus = 2;
  auto server = Server::Create(config, options);
  EXPECT_TRUE(server.ok()) << server.status();
  EXPECT_TRUE((*server)->Start().ok());
  return std::move(*server);
}

// The output of layer config `c` (seeded weights) for `query`, computed on its own.
std::vector<float> Expected(v1::LayerConfig c, const std::vector<float>& query) {
  EXPECT_TRUE(ApplyLayerDefaultsAndValidate(&c).ok());
  auto layer = LoadLayer(c);
  AttentionInputs in;
  in.query = TensorView::F32(query.data(), {1, kLen, kEmbed});
  auto out = (*layer)->engine->Forward(in, 1);
  EXPECT_TRUE(out.ok());
  return out->output.values;
}

v1::InferRequest Request(const std::string& layer, const std::vector<float>& query) {
  v1::InferRequest req;
  req.set_layer(layer);
  req.mutable_query()->add_shape(1);
  req.mutable_query()->add_shape(kLen);
  req.mutable_query()->add_shape(kEmbed);
  req.mutable_query()->set_dtype(v1::FLOAT32);
  req.mutable_query()->set_raw_data(query.data(), query.size() * sizeof(float));
  return req;
}

std::vector<float> Values(const v1::Tensor& t) {
  std::vector<float> v(t.raw_data().size() / sizeof(float));
  std::memcpy(v.data(), t.raw_data().data(), v.size() * sizeof(float));
  return v;
}

// worker_threads 0 (the default) becomes one worker per CPU the server may use; the served config keeps its 0,
// which is what a reload of the same file compares with.
TEST(LayerReloadTest, DefaultWorkersAreOnePerCpu) {
  std::unique_ptr<Server> server = StartServer();
  EXPECT_EQ(server->config().worker_threads(), 0);
  EXPECT_EQ(server->threads_per_batch(), 2);
  EXPECT_EQ(server->worker_threads(), 2);
  const v1::ServerConfig same = server->config();
  EXPECT_TRUE(server->ReloadConfig(same, /*reload_all=*/false).ok());
  EXPECT_EQ(server->worker_threads(), 2);
}

// The configured layers are warmed up before the server starts, as a loaded layer is: a first request builds no
// oneDNN primitive of a kind the layer had not run (the softmax's was built by the first request before), and
// the start-up log line, which lists them, is complete.
TEST(LayerReloadTest, ConfiguredLayersAreWarmedUpBeforeTheyServe) {
  std::unique_ptr<Server> server = StartServer();
  const std::vector<std::string> at_start = server->registry().Find("steady")->engine->ImplementationsUsed();
  std::mt19937_64 rng(5);
  auto channel =
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", server->ports().grpc), grpc::InsecureChannelCredentials());
  auto stub = v1::AttentionService::NewStub(channel);
  grpc::ClientContext ctx;
  v1::InferResponse resp;
  ASSERT_TRUE(stub->Infer(&ctx, Request("steady", testing::RandomValues(rng, kLen * kEmbed)), &resp).ok());
  EXPECT_EQ(absl::StrJoin(server->registry().Find("steady")->engine->ImplementationsUsed(), ","),
            absl::StrJoin(at_start, ","));
}

TEST(LayerReloadTest, ReplaceAndUnloadUnderTraffic) {
  std::unique_ptr<Server> server = StartServer();
  std::mt19937_64 rng(21);
  const std::vector<float> query = testing::RandomValues(rng, kLen * kEmbed);
  const std::vector<float> steady = Expected(Layer("steady", 1), query);
  std::map<uint64_t, std::vector<float>> churn;  // by seed
  for (uint64_t seed : {10, 11, 12}) churn[seed] = Expected(Layer("churn", seed), query);

  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server->ports().grpc),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::AttentionService::NewStub(channel);
  std::atomic<bool> stop{false};
  std::atomic<int> steady_ok{0}, churn_ok{0}, not_found{0}, wrong{0};
  std::vector<std::string> errors(4);
  std::vector<std::thread> clients;
  for (int c = 0; c < 4; ++c) {
    clients.emplace_back([&, c] {
      const std::string layer = c % 2 ? "churn" : "steady";
      const v1::InferRequest req = Request(layer, query);
      // Each client gets 40 answers (of any layer version) whatever the timing: under a sanitizer a load
      // takes long enough that the NOT_FOUND window after an unload once ate most of a fixed 40 iterations.
      int answered = 0;
      for (int i = 0; answered < 40 || !stop.load(); ++i) {
        grpc::ClientContext ctx;
        v1::InferResponse resp;
        const grpc::Status st = stub->Infer(&ctx, req, &resp);
        if (layer == "churn" && st.error_code() == grpc::StatusCode::NOT_FOUND) {
          ++not_found;  // between an unload and the next load
        } else if (!st.ok()) {
          ++wrong;
          errors[c] = st.error_message();
        } else if (layer == "steady") {
          ++answered;
          steady_ok += testing::MaxAbsDiff(Values(resp.output()), steady) <= 1e-5;
        } else {
          ++answered;
          bool matched = false;
          for (const auto& [seed, out] : churn) matched |= testing::MaxAbsDiff(Values(resp.output()), out) <= 1e-5;
          (matched ? churn_ok : wrong) += 1;
        }
        if (i > 2000) break;
      }
    });
  }
  std::weak_ptr<const ServedLayer> unloaded;
  for (int round = 0; round < 9; ++round) {
    if (round % 3 == 2) {
      unloaded = server->registry().Find("churn");
      ASSERT_TRUE(server->UnloadLayer("churn").ok());
      EXPECT_EQ(server->UnloadLayer("churn").code(), absl::StatusCode::kNotFound);
    }
    ASSERT_TRUE(server->LoadLayer(Layer("churn", 10 + round % 3)).ok());
  }
  stop.store(true);
  for (std::thread& t : clients) t.join();
  for (const std::string& e : errors) EXPECT_EQ(e, "");
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GE(steady_ok.load(), 80);
  EXPECT_GE(churn_ok.load(), 40);
  EXPECT_TRUE(unloaded.expired());  // unloaded, drained, and no request holds it any more
  EXPECT_EQ(server->registry().Find("churn")->version, 9 + 1);  // 1 + 9 loads
  const auto inflight = testing::FindMetric(*server->metrics().registry(), "attnserve_inflight_requests", {});
  EXPECT_EQ(inflight->value, 0);
  EXPECT_TRUE(server->Drain(absl::Now() + absl::Seconds(30)).ok());
}

// A load that fails (a bad config or unreadable weights) changes nothing: the old version keeps serving.
TEST(LayerReloadTest, FailedLoadLeavesTheOldVersion) {
  std::unique_ptr<Server> server = StartServer();
  v1::LayerConfig bad = Layer("churn", 11);
  bad.set_num_heads(5);
  const absl::Status invalid = server->LoadLayer(bad);
  EXPECT_EQ(invalid.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(invalid.message().find("layer.num_heads: 5 does not divide embed_dim 32"), absl::string_view::npos)
      << invalid;
  v1::LayerConfig missing = Layer("churn", 11);
  missing.set_weights_path("/nonexistent.safetensors");
  EXPECT_FALSE(server->LoadLayer(missing).ok());
  EXPECT_EQ(server->registry().Find("churn")->version, 1);
  EXPECT_EQ(server->registry().Find("churn")->config.seed(), 10u);
  ASSERT_TRUE(server->LoadLayer(Layer("fresh", 3)).ok());  // a new name gets its queue and metrics
  std::mt19937_64 rng(2);
  const std::vector<float> query = testing::RandomValues(rng, kLen * kEmbed);
  auto stub = v1::AttentionService::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", server->ports().grpc), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  v1::InferResponse resp;
  ASSERT_TRUE(stub->Infer(&ctx, Request("fresh", query), &resp).ok());
  EXPECT_LE(testing::MaxAbsDiff(Values(resp.output()), Expected(Layer("fresh", 3), query)), 1e-5);
  const auto count = testing::FindMetric(*server->metrics().registry(), "attnserve_requests_total",
                                         {{"layer", "fresh"}, {"version", "1"}, {"code", "OK"}});
  EXPECT_EQ(count->value, 1);
}

}  // namespace
}  // namespace attnserve
