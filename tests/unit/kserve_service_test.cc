// The Open Inference Protocol's service on a whole in-process server, from a C++ client built from
// proto/inference: answers equal attnserve.v1's on the same layer (and the engine's), streams report errors
// per request, statistics count what happened, the repository RPCs change layers while serving, and model
// control is refused unless enabled.
#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "inference/grpc_service.grpc.pb.h"
#include "tests/testing/server_harness.h"

namespace attnserve::testing {
namespace {

using inference::GRPCInferenceService;
using inference::ModelInferRequest;
using inference::ModelInferResponse;

[[maybe_unused]] ::testing::Environment* const kQuietLogs = ::testing::AddGlobalTestEnvironment(new QuietServerLogs);

constexpr char kConfig[] = R"pb(
  layers { name: "tiny" embed_dim: 32 num_heads: 4 seed: 5 batching { max_queue_delay_us: 20000 } }
)pb";
// A delay long enough for all of a test's threads to reach the queue, even under TSan.
constexpr char kLongDelayConfig[] = R"pb(
  layers { name: "tiny" embed_dim: 32 num_heads: 4 seed: 5 batching { max_queue_delay_us: 200000 } }
)pb";
constexpr char kControlConfig[] = R"pb(
  layers { name: "tiny" embed_dim: 32 num_heads: 4 seed: 5 }
  security { enable_model_control: true }
)pb";

ModelInferRequest ToKServe(const HostRequest& host) {
  ModelInferRequest r;
  r.set_model_name(host.layer);
  r.set_id(host.id);
  auto* in = r.add_inputs();
  in->set_name("query");
  in->set_datatype("FP32");
  for (int64_t d : host.query.shape) in->add_shape(d);
  r.add_raw_input_contents(std::string(reinterpret_cast<const char*>(host.query.f.data()), host.query.f.size() * 4));
  (*r.mutable_parameters())["need_weights"].set_bool_param(host.need_weights);
  return r;
}

std::vector<float> Floats(const std::string& raw) {
  std::vector<float> out(raw.size() / 4);
  std::memcpy(out.data(), raw.data(), out.size() * 4);
  return out;
}

class KServeServiceTest : public ::testing::Test {
 protected:
  void Start(const char* config) {
    auto server = StartInProcessServer(config);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    kserve_ = GRPCInferenceService::NewStub(server_->channel);
  }
  grpc::Status Infer(const ModelInferRequest& r, ModelInferResponse* response) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(absl::Seconds(30)));
    return kserve_->ModelInfer(&ctx, r, response);
  }
  template <typename Req, typename Resp>
  grpc::Status Call(grpc::Status (GRPCInferenceService::Stub::*rpc)(grpc::ClientContext*, const Req&, Resp*),
                    const Req& request, Resp* response) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(absl::Seconds(30)));
    return ((*kserve_).*rpc)(&ctx, request, response);
  }

  // Sends `hosts` at once, even ones over KServe and odd ones over attnserve.v1, each from its own thread;
  // checks every answer against the engine; returns the largest batch any of them was computed in.
  int64_t InferBothProtocolsAtOnce(const std::vector<HostRequest>& hosts) {
    std::vector<std::string> outputs(hosts.size());
    std::vector<int64_t> batch_sizes(hosts.size());
    std::vector<std::thread> clients;
    for (size_t i = 0; i < hosts.size(); ++i) {
      clients.emplace_back([&, i] {
        if (i % 2 == 0) {
          ModelInferResponse r;
          if (Infer(ToKServe(hosts[i]), &r).ok() && r.raw_output_contents_size() == 1) {
            outputs[i] = r.raw_output_contents(0);
            batch_sizes[i] = r.parameters().at("batch_size").int64_param();
          }
        } else {
          v1::InferResponse r;
          grpc::ClientContext ctx;
          ctx.set_deadline(In(absl::Seconds(30)));
          if (server_->stub->Infer(&ctx, hosts[i].ToProto(), &r).ok()) {
            outputs[i] = r.output().raw_data();
            batch_sizes[i] = r.timing().batch_size();
          }
        }
      });
    }
    for (auto& c : clients) c.join();
    int64_t largest = 0;
    for (size_t i = 0; i < hosts.size(); ++i) {
      const AttentionOutputs want = Expected(Engine(32, 4, 5), hosts[i]);
      const std::vector<float> got = Floats(outputs[i]);
      EXPECT_EQ(got.size(), want.output.values.size()) << "request " << i;
      if (got.size() != want.output.values.size()) return 0;
      for (size_t j = 0; j < got.size(); ++j) {
        EXPECT_NEAR(got[j], want.output.values[j], kTolerance) << "request " << i << ", element " << j;
        if (HasFailure()) return 0;
      }
      largest = std::max(largest, batch_sizes[i]);
    }
    return largest;
  }

  std::unique_ptr<TestServer> server_;
  std::unique_ptr<GRPCInferenceService::Stub> kserve_;
  std::mt19937_64 rng_{21};
};

TEST_F(KServeServiceTest, AnswersEqualAttnserveV1AndTheEngine) {
  Start(kConfig);
  HostRequest host = SelfAttention(rng_, "tiny", 32, 2, 5);
  host.id = "same";
  host.need_weights = true;
  ModelInferResponse kserve;
  ASSERT_TRUE(Infer(ToKServe(host), &kserve).ok());
  v1::InferResponse v1_answer;
  grpc::ClientContext ctx;
  ASSERT_TRUE(server_->stub->Infer(&ctx, host.ToProto(), &v1_answer).ok());
  ASSERT_EQ(kserve.raw_output_contents_size(), 2);
  EXPECT_EQ(kserve.raw_output_contents(0), v1_answer.output().raw_data());  // bit for bit
  EXPECT_EQ(kserve.raw_output_contents(1), v1_answer.attn_weights().raw_data());
  EXPECT_EQ(kserve.id(), "same");
  EXPECT_EQ(kserve.model_version(), "1");
  const AttentionOutputs want = Expected(Engine(32, 4, 5), host);
  const std::vector<float> got = Floats(kserve.raw_output_contents(0));
  ASSERT_EQ(got.size(), want.output.values.size());
  for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want.output.values[i], kTolerance) << i;
}

TEST_F(KServeServiceTest, BothProtocolsBatchTogether) {
  Start(kLongDelayConfig);
  std::vector<HostRequest> hosts;
  for (int i = 0; i < 8; ++i) hosts.push_back(SelfAttention(rng_, "tiny", 32, 1, 3 + i % 3));
  // 4 requests per protocol: a batch of more than 4 holds both (pigeonhole). Up to three rounds: on a loaded
  // machine a thread may reach the queue after the 200 ms delay.
  int64_t largest = 0;
  for (int round = 0; round < 3 && largest <= 4 && !HasFailure(); ++round) {
    largest = InferBothProtocolsAtOnce(hosts);
  }
  EXPECT_GT(largest, 4) << "the 200 ms batching delay should gather the 8 concurrent requests, 4 of each protocol";
}

TEST_F(KServeServiceTest, StreamAnswersEachRequestAndReportsErrorsInPlace) {
  Start(kConfig);
  grpc::ClientContext ctx;
  ctx.set_deadline(In(absl::Seconds(30)));
  auto stream = kserve_->ModelStreamInfer(&ctx);
  std::map<std::string, HostRequest> valid;
  for (int i = 0; i < 10; ++i) {
    HostRequest host = SelfAttention(rng_, "tiny", 32, 1, 2 + i % 4);
    host.id = "r" + std::to_string(i);
    ModelInferRequest r = ToKServe(host);
    if (i % 3 == 1) r.mutable_inputs(0)->set_datatype("INT8");
    if (i % 3 != 1) valid[host.id] = host;
    ASSERT_TRUE(stream->Write(r));
  }
  stream->WritesDone();
  inference::ModelStreamInferResponse response;
  int answered = 0, errors = 0;
  while (stream->Read(&response)) {
    ++answered;
    const std::string& id = response.infer_response().id();
    if (!response.error_message().empty()) {
      ++errors;
      EXPECT_EQ(valid.count(id), 0u) << id;
      EXPECT_NE(response.error_message().find("query: datatype"), std::string::npos) << response.error_message();
      continue;
    }
    ASSERT_EQ(valid.count(id), 1u) << id;
    const AttentionOutputs want = Expected(Engine(32, 4, 5), valid[id]);
    const std::vector<float> got = Floats(response.infer_response().raw_output_contents(0));
    ASSERT_EQ(got.size(), want.output.values.size());
    for (size_t j = 0; j < got.size(); ++j) ASSERT_NEAR(got[j], want.output.values[j], kTolerance);
  }
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(answered, 10);
  EXPECT_EQ(errors, 3);
}

TEST_F(KServeServiceTest, StatisticsCountRequestsAndBatches) {
  Start(kConfig);
  for (int i = 0; i < 3; ++i) {
    ModelInferResponse r;
    ASSERT_TRUE(Infer(ToKServe(SelfAttention(rng_, "tiny", 32, 2, 4)), &r).ok());
  }
  ModelInferResponse r;
  ModelInferRequest wrong = ToKServe(SelfAttention(rng_, "tiny", 16, 1, 4));  // E 16 on a layer of 32
  EXPECT_EQ(Infer(wrong, &r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  inference::ModelStatisticsRequest request;
  request.set_name("tiny");
  inference::ModelStatisticsResponse stats;
  ASSERT_TRUE(Call(&GRPCInferenceService::Stub::ModelStatistics, request, &stats).ok());
  ASSERT_EQ(stats.model_stats_size(), 1);
  const inference::ModelStatistics& s = stats.model_stats(0);
  EXPECT_EQ(s.version(), "1");
  EXPECT_EQ(s.inference_stats().success().count(), 3u);
  EXPECT_EQ(s.inference_stats().fail().count(), 1u);
  EXPECT_EQ(s.inference_count(), 6u);  // B = 2 each
  EXPECT_GE(s.execution_count(), 1u);
  EXPECT_GT(s.inference_stats().compute_infer().ns(), 0u);
  ASSERT_GT(s.batch_stats_size(), 0);
  EXPECT_GE(s.batch_stats(0).batch_size(), 1u);
  request.set_name("nope");
  EXPECT_EQ(Call(&GRPCInferenceService::Stub::ModelStatistics, request, &stats).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

TEST_F(KServeServiceTest, MetadataConfigAndReadiness) {
  Start(kConfig);
  inference::ModelMetadataRequest request;
  request.set_name("tiny");
  inference::ModelMetadataResponse metadata;
  ASSERT_TRUE(Call(&GRPCInferenceService::Stub::ModelMetadata, request, &metadata).ok());
  ASSERT_EQ(metadata.inputs_size(), 5);
  EXPECT_EQ(metadata.inputs(0).name(), "query");
  EXPECT_EQ(metadata.inputs(0).shape(2), 32);
  EXPECT_EQ(metadata.outputs(0).name(), "output");
  inference::ModelConfigRequest config_request;
  config_request.set_name("tiny");
  inference::ModelConfigResponse config;
  ASSERT_TRUE(Call(&GRPCInferenceService::Stub::ModelConfig, config_request, &config).ok());
  EXPECT_EQ(config.config().dynamic_batching().max_queue_delay_microseconds(), 20000u);
  EXPECT_FALSE(config.config().input(0).optional());
  EXPECT_TRUE(config.config().input(1).optional());
  inference::ServerReadyResponse ready;
  ASSERT_TRUE(Call(&GRPCInferenceService::Stub::ServerReady, inference::ServerReadyRequest(), &ready).ok());
  EXPECT_TRUE(ready.ready());
  server_->server->StopAccepting();
  ASSERT_TRUE(Call(&GRPCInferenceService::Stub::ServerReady, inference::ServerReadyRequest(), &ready).ok());
  EXPECT_FALSE(ready.ready()) << "draining";
}

TEST_F(KServeServiceTest, ModelControlIsOffByDefault) {
  Start(kConfig);
  inference::RepositoryModelLoadRequest load;
  load.set_model_name("tiny");
  inference::RepositoryModelLoadResponse loaded;
  const grpc::Status refused = Call(&GRPCInferenceService::Stub::RepositoryModelLoad, load, &loaded);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_NE(refused.error_message().find("--enable-model-control"), std::string::npos) << Str(refused);
}

TEST_F(KServeServiceTest, RepositoryLoadsReloadsAndUnloadsWhileServing) {
  Start(kControlConfig);
  const HostRequest host = SelfAttention(rng_, "tiny", 32, 1, 3);
  ModelInferResponse before;
  ASSERT_TRUE(Infer(ToKServe(host), &before).ok());
  inference::RepositoryModelLoadRequest load;
  load.set_model_name("tiny");
  inference::RepositoryModelLoadResponse loaded;
  ASSERT_TRUE(Call(&GRPCInferenceService::Stub::RepositoryModelLoad, load, &loaded).ok());
  ModelInferResponse after;
  ASSERT_TRUE(Infer(ToKServe(host), &after).ok());
  EXPECT_EQ(after.model_version(), "2");
  EXPECT_EQ(after.raw_output_contents(0), before.raw_output_contents(0));  // same seed, same answer

  inference::RepositoryModelUnloadRequest unload;
  unload.set_model_name("tiny");
  inference::RepositoryModelUnloadResponse unloaded;
  ASSERT_TRUE(Call(&GRPCInferenceService::Stub::RepositoryModelUnload, unload, &unloaded).ok());
  EXPECT_EQ(Infer(ToKServe(host), &after).error_code(), grpc::StatusCode::NOT_FOUND);
  inference::RepositoryIndexResponse index;
  ASSERT_TRUE(Call(&GRPCInferenceService::Stub::RepositoryIndex, inference::RepositoryIndexRequest(), &index).ok());
  ASSERT_EQ(index.models_size(), 1);
  EXPECT_EQ(index.models(0).state(), "UNAVAILABLE");
  EXPECT_EQ(index.models(0).reason(), "unloaded");

  load.set_model_name("fresh");
  (*load.mutable_parameters())["config"].set_string_param(R"({"name": "fresh", "embedDim": 16, "numHeads": 2})");
  ASSERT_TRUE(Call(&GRPCInferenceService::Stub::RepositoryModelLoad, load, &loaded).ok());
  ASSERT_TRUE(Infer(ToKServe(SelfAttention(rng_, "fresh", 16, 1, 2)), &after).ok());
  (*load.mutable_parameters())["config"].set_string_param("{not json");
  const grpc::Status bad_json = Call(&GRPCInferenceService::Stub::RepositoryModelLoad, load, &loaded);
  EXPECT_EQ(bad_json.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(bad_json.error_message().find("parameters.config"), std::string::npos) << Str(bad_json);
}

// max_versions 2: a reload keeps the previous version serving requests that pin it, in both protocols.
TEST_F(KServeServiceTest, PinnedVersionsServeSideBySide) {
  Start(R"pb(
    layers { name: "tiny" embed_dim: 32 num_heads: 4 seed: 5 max_versions: 2 }
    security { enable_model_control: true }
  )pb");
  const HostRequest host = SelfAttention(rng_, "tiny", 32, 1, 3);
  ModelInferResponse v1_answer;
  ASSERT_TRUE(Infer(ToKServe(host), &v1_answer).ok());
  inference::RepositoryModelLoadRequest load;
  load.set_model_name("tiny");
  (*load.mutable_parameters())["config"].set_string_param(
      R"({"name": "tiny", "embedDim": 32, "numHeads": 4, "seed": "6", "maxVersions": 2})");
  inference::RepositoryModelLoadResponse loaded;
  ASSERT_TRUE(Call(&GRPCInferenceService::Stub::RepositoryModelLoad, load, &loaded).ok());

  ModelInferResponse newest, pinned;
  ASSERT_TRUE(Infer(ToKServe(host), &newest).ok());
  EXPECT_EQ(newest.model_version(), "2");
  EXPECT_NE(newest.raw_output_contents(0), v1_answer.raw_output_contents(0));  // seed 6, not 5
  ModelInferRequest old = ToKServe(host);
  old.set_model_version("1");
  ASSERT_TRUE(Infer(old, &pinned).ok());
  EXPECT_EQ(pinned.model_version(), "1");
  EXPECT_EQ(pinned.raw_output_contents(0), v1_answer.raw_output_contents(0));
  v1::InferRequest v1_pinned = host.ToProto();
  v1_pinned.set_version(1);
  v1::InferResponse v1_response;
  grpc::ClientContext ctx;
  ASSERT_TRUE(server_->stub->Infer(&ctx, v1_pinned, &v1_response).ok());
  EXPECT_EQ(v1_response.output().raw_data(), v1_answer.raw_output_contents(0));

  inference::ModelMetadataRequest metadata_request;
  metadata_request.set_name("tiny");
  inference::ModelMetadataResponse metadata;
  ASSERT_TRUE(Call(&GRPCInferenceService::Stub::ModelMetadata, metadata_request, &metadata).ok());
  ASSERT_EQ(metadata.versions_size(), 2);
  EXPECT_EQ(metadata.versions(0), "1");
  EXPECT_EQ(metadata.versions(1), "2");

  ASSERT_TRUE(Call(&GRPCInferenceService::Stub::RepositoryModelLoad, load, &loaded).ok());  // version 3
  const grpc::Status gone = Infer(old, &pinned);
  EXPECT_EQ(gone.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(gone.error_message().find("model_version: layer 'tiny' has version(s) 2, 3, not 1"), std::string::npos)
      << Str(gone);
}

// A drain that begins while a layer loads (E=4096: 256 MiB of weights built, then a warm-up per team size)
// does not wait for the whole load: the load stops at its next step, answered UNAVAILABLE, and is not published
// into a scheduler that is shutting down.
TEST_F(KServeServiceTest, ADrainAbandonsARunningLoadAtItsNextStep) {
  Start(kControlConfig);
  inference::RepositoryModelLoadRequest load;
  load.set_model_name("big");
  (*load.mutable_parameters())["config"].set_string_param(R"({"name": "big", "embedDim": 4096, "numHeads": 32})");
  grpc::Status loaded_status;
  absl::Time load_answered;
  std::thread loader([&] {
    inference::RepositoryModelLoadResponse loaded;
    grpc::ClientContext ctx;
    ctx.set_deadline(In(absl::Seconds(120)));
    loaded_status = kserve_->RepositoryModelLoad(&ctx, load, &loaded);
    load_answered = absl::Now();
  });
  bool loading = false;
  for (const absl::Time give_up = absl::Now() + absl::Seconds(30); !loading && absl::Now() < give_up;) {
    inference::RepositoryIndexResponse index;
    ASSERT_TRUE(Call(&GRPCInferenceService::Stub::RepositoryIndex, inference::RepositoryIndexRequest(), &index).ok());
    for (const auto& model : index.models()) loading |= model.name() == "big" && model.state() == "LOADING";
    if (!loading) absl::SleepFor(absl::Milliseconds(2));
  }
  ASSERT_TRUE(loading) << "the load never showed as LOADING";
  const absl::Time drain_start = absl::Now();
  const absl::Status drained = server_->server->Drain(drain_start + absl::Seconds(60));
  const absl::Time drained_at = absl::Now();
  loader.join();
  std::printf("    the load answered %s after the drain began; the drain (with its 1 s linger) took %s\n",
              absl::FormatDuration(load_answered - drain_start).c_str(),
              absl::FormatDuration(drained_at - drain_start).c_str());
  EXPECT_TRUE(drained.ok()) << drained;
  EXPECT_EQ(loaded_status.error_code(), grpc::StatusCode::UNAVAILABLE) << Str(loaded_status);
  EXPECT_NE(loaded_status.error_message().find("the load of layer \"big\" was abandoned"), std::string::npos)
      << Str(loaded_status);
  EXPECT_EQ(server_->server->registry().Find("big"), nullptr);
}

// A server that fails to build (here: weights that do not parse) reports it; it must not crash on the way
// out (its destructor ran before the KServe service existed).
TEST(KServeServerBuildTest, AFailedBuildIsAnErrorNotACrash) {
  const std::string path = TempPath("corrupt.safetensors");
  { std::ofstream(path, std::ios::binary) << "not a safetensors file"; }
  auto server = StartInProcessServer(absl::StrCat(R"pb(layers { name: "x" embed_dim: 8 num_heads: 2 weights_path: ")pb",
                                                  path, R"pb(" })pb"));
  EXPECT_FALSE(server.ok());
}

}  // namespace
}  // namespace attnserve::testing
