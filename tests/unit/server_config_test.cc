// Config loading/defaulting/validation (server/startup/server_config.h) and command-line flags
// (server/startup/server_flags.h).
#include "server/startup/server_config.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "server/startup/restart_fields.h"
#include "server/startup/server_flags.h"
#include "server/startup/transport_config.h"
#include "server/transport/memory_guard.h"

namespace attnserve {
namespace {

using attnserve::v1::LayerConfig;
using attnserve::v1::ServerConfig;
using ::testing::AllOf;
using ::testing::HasSubstr;

// Writes `contents` to a fresh file under the test temp dir and returns its path.
std::string WriteTemp(const std::string& name, const std::string& contents) {
  const std::string path = ::testing::TempDir() + "/" + name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
  out.close();
  EXPECT_TRUE(out.good()) << path;
  return path;
}

bool ProtoEquals(const google::protobuf::Message& a, const google::protobuf::Message& b) {
  return google::protobuf::util::MessageDifferencer::Equals(a, b);
}

// A small valid config, before defaults.
ServerConfig OneLayer() {
  ServerConfig config;
  LayerConfig* layer = config.add_layers();
  layer->set_name("l0");
  layer->set_embed_dim(64);
  layer->set_num_heads(4);
  return config;
}

// The error message of ApplyDefaultsAndValidate, expecting InvalidArgument.
std::string ValidationError(ServerConfig config) {
  const absl::Status status = ApplyDefaultsAndValidate(&config);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  return std::string(status.message());
}

// ---------------------------------------------------------------------------------------------------
// Default config and shipped files.

TEST(DefaultServerConfig, HasSmallAndBaseAndValidates) {
  ServerConfig config = DefaultServerConfig();
  ASSERT_EQ(config.layers_size(), 2);
  EXPECT_EQ(config.layers(0).name(), "small");
  EXPECT_EQ(config.layers(0).embed_dim(), 256);
  EXPECT_EQ(config.layers(0).num_heads(), 4);
  EXPECT_EQ(config.layers(0).seed(), 1u);
  EXPECT_EQ(config.layers(1).name(), "base");
  EXPECT_EQ(config.layers(1).embed_dim(), 768);
  EXPECT_EQ(config.layers(1).num_heads(), 12);
  EXPECT_EQ(config.layers(1).seed(), 2u);
  for (const LayerConfig& layer : config.layers()) {
    EXPECT_TRUE(layer.weights_path().empty());
    EXPECT_FALSE(layer.has_batching()) << "default batching";
  }
  ASSERT_TRUE(ApplyDefaultsAndValidate(&config).ok());
}

TEST(DefaultServerConfig, DefaultsAreFilled) {
  ServerConfig config = DefaultServerConfig();
  config.clear_grpc_address();
  config.clear_metrics_address();
  config.clear_worker_threads();
  ASSERT_TRUE(ApplyDefaultsAndValidate(&config).ok());
  EXPECT_EQ(config.grpc_address(), "0.0.0.0:50051");
  EXPECT_EQ(config.metrics_address(), "0.0.0.0:9464");
  EXPECT_EQ(config.worker_threads(), 0);  // one per CPU, resolved by the Server
  const LayerConfig& base = config.layers(1);
  ASSERT_TRUE(base.has_bias());
  EXPECT_TRUE(base.bias());
  EXPECT_EQ(base.kdim(), 768);
  EXPECT_EQ(base.vdim(), 768);
  EXPECT_EQ(base.max_sequence_length(), 4096);
  EXPECT_EQ(base.batching().max_batch_size(), 32);
  EXPECT_EQ(base.batching().max_queue_size(), 1024);
  EXPECT_EQ(base.batching().max_batch_tokens(), 8192);
  EXPECT_EQ(base.batching().max_queue_delay_us(), 0) << "0 means eager and stays 0";
  EXPECT_EQ(base.max_batch(), 256);
  EXPECT_EQ(base.max_tokens(), 32768);
  EXPECT_EQ(base.max_response_bytes(), 32 << 20);
  EXPECT_EQ(config.max_inflight_per_stream(), 32);
}

TEST(DefaultServerConfig, RequestLimitsAreChecked) {
  ServerConfig config = OneLayer();
  config.mutable_layers(0)->set_max_batch(-1);
  config.mutable_layers(0)->set_max_response_bytes(int64_t{61} << 20);
  config.mutable_layers(0)->set_max_versions(9);
  config.mutable_layers(0)->set_compute_dtype(static_cast<LayerConfig::ComputeDtype>(7));
  config.set_max_inflight_per_stream(-3);
  config.mutable_sessions()->set_max_opens_waiting(-2);
  const absl::Status s = ApplyDefaultsAndValidate(&config);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  for (const char* needle : {"layers[0].max_batch: must be >= 0, got -1",
                             "layers[0].max_response_bytes: must be between 0 and 62914560 (the gRPC message limit "
                             "less framing), got 63963136",
                             "layers[0].max_versions: must be in [0, 8] (0 = 1), got 9",
                             "layers[0].compute_dtype: must be FLOAT32 or BFLOAT16, got 7",
                             "max_inflight_per_stream: must be >= 0 (0 = 32), got -3",
                             "sessions.max_opens_waiting: must be >= 0 (0 = the default), got -2"}) {
    EXPECT_NE(s.message().find(needle), absl::string_view::npos) << needle << "\n" << s;
  }
}

TEST(DefaultServerConfig, ExplicitValuesAreKept) {
  ServerConfig config = OneLayer();
  LayerConfig* layer = config.mutable_layers(0);
  layer->set_bias(false);
  layer->set_kdim(32);
  layer->set_vdim(16);
  layer->set_max_sequence_length(100);
  layer->mutable_batching()->set_max_batch_size(1);
  layer->mutable_batching()->set_max_queue_delay_us(250);
  layer->mutable_batching()->set_max_queue_size(7);
  layer->mutable_batching()->set_max_batch_tokens(99);
  layer->set_max_batch(5);
  layer->set_max_tokens(500);
  layer->set_max_response_bytes(12345);
  layer->set_max_versions(3);
  config.set_worker_threads(3);
  config.set_max_inflight_per_stream(2);
  const ServerConfig before = config;
  ASSERT_TRUE(ApplyDefaultsAndValidate(&config).ok());
  config.clear_grpc_address();
  config.clear_metrics_address();
  config.clear_security();   // defaulted (SecurityAndTransport tests)
  config.clear_transport();
  EXPECT_TRUE(ProtoEquals(config, before)) << config.DebugString();
}

TEST(DeployConfig, DefaultPbtxtMatchesEmbeddedDefault) {
  absl::StatusOr<ServerConfig> loaded = LoadServerConfigFile("deploy/config/default.pbtxt");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_TRUE(ProtoEquals(*loaded, DefaultServerConfig())) << loaded->DebugString();
  EXPECT_TRUE(ApplyDefaultsAndValidate(&*loaded).ok());
}

// The Kubernetes config's memory, set rather than derived, adds up below where the memory guard acts in a pod of
// deployment.yaml's limit: the budget, the KV cache, twice gRPC's quota (as the guard counts it) and 256 MiB for
// the process itself (48 MiB measured with the config's layers).
TEST(DeployConfig, KubernetesMemoryAddsUpWithinThePodLimit) {
  absl::StatusOr<ServerConfig> config = LoadServerConfigFile("deploy/k8s/config.pbtxt");
  ASSERT_TRUE(config.ok()) << config.status();
  std::ifstream deployment("deploy/k8s/deployment.yaml");
  const std::string yaml((std::istreambuf_iterator<char>(deployment)), std::istreambuf_iterator<char>());
  const size_t limits = yaml.find("limits:");
  ASSERT_NE(limits, std::string::npos);
  const size_t memory = yaml.find("memory: ", limits);
  ASSERT_NE(memory, std::string::npos);
  const size_t gi = yaml.find("Gi", memory);
  ASSERT_NE(gi, std::string::npos);
  const int64_t pod_limit_bytes = std::stoll(yaml.substr(memory + 8, gi - memory - 8)) << 30;
  EXPECT_GT(config->memory_budget_bytes(), 0);
  EXPECT_GT(config->sessions().kv_cache_bytes(), 0);
  EXPECT_GT(config->transport().grpc_memory_bytes(), 0);
  const int64_t held = config->memory_budget_bytes() + config->sessions().kv_cache_bytes() +
                       2 * config->transport().grpc_memory_bytes() + (int64_t{256} << 20);
  EXPECT_LE(held, MemoryGuardCapBytes(pod_limit_bytes)) << "pod limit " << pod_limit_bytes;
  EXPECT_TRUE(ApplyDefaultsAndValidate(&*config).ok());
}

TEST(DeployConfig, ExampleJsonValidates) {
  absl::StatusOr<ServerConfig> loaded = LoadServerConfigFile("deploy/config/example.json");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_GE(loaded->layers_size(), 1);
  const absl::Status status = ApplyDefaultsAndValidate(&*loaded);
  EXPECT_TRUE(status.ok()) << status;
}

// ---------------------------------------------------------------------------------------------------
// File loading.

constexpr char kPbtxt[] = R"pb(
grpc_address: "localhost:1234"
worker_threads: 2
layers {
  name: "enc.0"
  embed_dim: 128
  num_heads: 8
  kdim: 64
  bias: false
  seed: 7
  batching { max_batch_size: 4 max_queue_delay_us: 200 }
}
layers { name: "b" embed_dim: 32 num_heads: 2 }
)pb";

// The same config; mixes lowerCamelCase and original field names, both accepted.
constexpr char kJson[] = R"json({
  "grpcAddress": "localhost:1234",
  "worker_threads": 2,
  "layers": [
    {"name": "enc.0", "embedDim": 128, "num_heads": 8, "kdim": "64", "bias": false, "seed": "7",
     "batching": {"maxBatchSize": 4, "max_queue_delay_us": 200}},
    {"name": "b", "embedDim": 32, "numHeads": 2}
  ]
})json";

TEST(LoadServerConfigFile, PbtxtAndJsonLoadTheSameConfig) {
  for (const char* ext : {".pbtxt", ".textproto", ".txtpb"}) {
    absl::StatusOr<ServerConfig> text = LoadServerConfigFile(WriteTemp(std::string("same") + ext, kPbtxt));
    absl::StatusOr<ServerConfig> json = LoadServerConfigFile(WriteTemp("same.json", kJson));
    ASSERT_TRUE(text.ok()) << text.status();
    ASSERT_TRUE(json.ok()) << json.status();
    EXPECT_TRUE(ProtoEquals(*text, *json)) << text->DebugString() << "\nvs\n" << json->DebugString();
    EXPECT_TRUE(text->layers(0).has_bias());
    EXPECT_FALSE(text->layers(0).bias());
    EXPECT_FALSE(text->layers(1).has_bias());
    EXPECT_TRUE(ApplyDefaultsAndValidate(&*text).ok());
  }
}

TEST(LoadServerConfigFile, TextSyntaxErrorReportsFileLineColumn) {
  const std::string path = WriteTemp("syntax.pbtxt", "worker_threads: 1\nlayers {\n  name: \"x\"\n  embed_dim: }\n");
  absl::StatusOr<ServerConfig> config = LoadServerConfigFile(path);
  ASSERT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  // Line 4, column 14 (1-based): the "}" where a number belongs.
  EXPECT_THAT(config.status().message(), HasSubstr(path + ":4:14: "));
}

TEST(LoadServerConfigFile, TextUnknownFieldIsAnError) {
  const std::string path = WriteTemp("unknown.pbtxt", "layers { name: \"x\" embed_dimm: 4 }\n");
  absl::StatusOr<ServerConfig> config = LoadServerConfigFile(path);
  ASSERT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(config.status().message(), AllOf(HasSubstr("embed_dimm"), HasSubstr(path + ":1:")));
}

TEST(LoadServerConfigFile, JsonUnknownFieldIsAnError) {
  const std::string path = WriteTemp("unknown.json", R"({"layers": [{"name": "x", "numHeadz": 4}]})");
  absl::StatusOr<ServerConfig> config = LoadServerConfigFile(path);
  ASSERT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(config.status().message(), AllOf(HasSubstr("numHeadz"), HasSubstr(path)));
}

TEST(LoadServerConfigFile, JsonSyntaxErrorIsAnError) {
  const std::string path = WriteTemp("syntax.json", R"({"layers": [{"name": "x",]})");
  absl::StatusOr<ServerConfig> config = LoadServerConfigFile(path);
  ASSERT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(config.status().message(), HasSubstr(path));
}

TEST(LoadServerConfigFile, UnknownExtensionIsInvalidArgument) {
  const std::string path = WriteTemp("config.yaml", "layers: []\n");
  absl::StatusOr<ServerConfig> config = LoadServerConfigFile(path);
  ASSERT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(config.status().message(),
              AllOf(HasSubstr(path), HasSubstr(".pbtxt"), HasSubstr(".textproto"), HasSubstr(".txtpb"),
                    HasSubstr(".json")));
}

TEST(LoadServerConfigFile, MissingFileIsNotFound) {
  const std::string path = ::testing::TempDir() + "/does-not-exist.pbtxt";
  absl::StatusOr<ServerConfig> config = LoadServerConfigFile(path);
  ASSERT_EQ(config.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(config.status().message(), HasSubstr(path));
}

TEST(LoadServerConfigFile, DirectoryIsAnError) {
  const std::string dir = ::testing::TempDir() + "/a_dir.pbtxt";
  std::remove(dir.c_str());
  ASSERT_TRUE(std::filesystem::create_directories(dir) || std::filesystem::is_directory(dir));
  absl::StatusOr<ServerConfig> config = LoadServerConfigFile(dir);
  EXPECT_FALSE(config.ok());
  EXPECT_THAT(config.status().message(), HasSubstr(dir));
}

// ---------------------------------------------------------------------------------------------------
// Validation: every rule's error names the field path.

TEST(Validate, NoLayers) {
  EXPECT_THAT(ValidationError(ServerConfig()), HasSubstr("layers: at least one layer"));
}

TEST(Validate, NumHeadsMustDivideEmbedDim) {
  ServerConfig config = OneLayer();
  LayerConfig* base = config.add_layers();
  base->set_name("base");
  base->set_embed_dim(768);
  base->set_num_heads(5);
  EXPECT_THAT(ValidationError(config), HasSubstr("layers[1].num_heads: 5 does not divide embed_dim 768"));
}

TEST(Validate, LayerNameCharacters) {
  ServerConfig config = OneLayer();
  config.mutable_layers(0)->set_name("bad name");
  EXPECT_THAT(ValidationError(config),
              HasSubstr(R"(layers[0].name: must match [A-Za-z0-9_.-]{1,128}, got "bad name")"));
  config.mutable_layers(0)->set_name("");
  EXPECT_THAT(ValidationError(config), HasSubstr(R"(layers[0].name: must match [A-Za-z0-9_.-]{1,128}, got "")"));
  config.mutable_layers(0)->set_name(std::string(129, 'a'));  // names reach logs and labels: bounded
  EXPECT_THAT(ValidationError(config), HasSubstr("layers[0].name: must match [A-Za-z0-9_.-]{1,128}, got \"aaa"));
  config.mutable_layers(0)->set_name("Enc-1.self_attn");
  EXPECT_TRUE(ApplyDefaultsAndValidate(&config).ok());
}

TEST(Validate, DuplicateLayerNames) {
  ServerConfig config = OneLayer();
  *config.add_layers() = config.layers(0);
  EXPECT_THAT(ValidationError(config), AllOf(HasSubstr("layers[1].name: duplicate \"l0\""), HasSubstr("layers[0]")));
}

TEST(Validate, WorkerThreadsRange) {
  ServerConfig config = OneLayer();
  config.set_worker_threads(-1);
  EXPECT_THAT(ValidationError(config), HasSubstr("worker_threads: must be between 0 (one per CPU) and 256, got -1"));
  config.set_worker_threads(257);
  EXPECT_THAT(ValidationError(config), HasSubstr("worker_threads: must be between 0 (one per CPU) and 256, got 257"));
  config.set_worker_threads(256);
  EXPECT_TRUE(ApplyDefaultsAndValidate(&config).ok());
  config.set_worker_threads(0);
  EXPECT_TRUE(ApplyDefaultsAndValidate(&config).ok());
  EXPECT_EQ(config.worker_threads(), 0);
}

TEST(Validate, DimensionsMustBePositive) {
  ServerConfig config = OneLayer();
  config.mutable_layers(0)->set_embed_dim(-64);
  EXPECT_THAT(ValidationError(config), HasSubstr("layers[0].embed_dim: must be > 0, got -64"));
  // Missing embed_dim: reported once, not again through the defaulted kdim/vdim.
  config = OneLayer();
  config.mutable_layers(0)->clear_embed_dim();
  EXPECT_EQ(ValidationError(config), "layers[0].embed_dim: must be > 0, got 0");
  config = OneLayer();
  config.mutable_layers(0)->set_num_heads(0);
  EXPECT_THAT(ValidationError(config), HasSubstr("layers[0].num_heads: must be > 0, got 0"));
  config.mutable_layers(0)->set_num_heads(-2);
  EXPECT_THAT(ValidationError(config), HasSubstr("layers[0].num_heads: must be > 0, got -2"));
}

TEST(Validate, NegativeValues) {
  struct Case {
    void (*mutate)(LayerConfig*);
    const char* expected;
  };
  const std::vector<Case> cases = {
      {[](LayerConfig* l) { l->set_kdim(-1); }, "layers[0].kdim: must be >= 0"},
      {[](LayerConfig* l) { l->set_vdim(-1); }, "layers[0].vdim: must be >= 0"},
      {[](LayerConfig* l) { l->set_max_sequence_length(-1); }, "layers[0].max_sequence_length: must be >= 0"},
      {[](LayerConfig* l) { l->mutable_batching()->set_max_batch_size(-1); },
       "layers[0].batching.max_batch_size: must be >= 0, got -1"},
      {[](LayerConfig* l) { l->mutable_batching()->set_max_queue_delay_us(-1); },
       "layers[0].batching.max_queue_delay_us: must be >= 0, got -1"},
      {[](LayerConfig* l) { l->mutable_batching()->set_max_queue_size(-1); },
       "layers[0].batching.max_queue_size: must be >= 0, got -1"},
      {[](LayerConfig* l) { l->mutable_batching()->set_max_batch_tokens(-1); },
       "layers[0].batching.max_batch_tokens: must be >= 0, got -1"},
  };
  for (const Case& c : cases) {
    ServerConfig config = OneLayer();
    c.mutate(config.mutable_layers(0));
    EXPECT_THAT(ValidationError(config), HasSubstr(c.expected));
  }
}

TEST(Validate, MaxBatchSizeAboveMaxQueueSize) {
  ServerConfig config = OneLayer();
  config.mutable_layers(0)->mutable_batching()->set_max_batch_size(64);
  config.mutable_layers(0)->mutable_batching()->set_max_queue_size(16);
  EXPECT_THAT(ValidationError(config), HasSubstr("layers[0].batching.max_batch_size: 64 exceeds max_queue_size 16"));
  // Against the defaulted queue size (1024) too.
  config.mutable_layers(0)->mutable_batching()->clear_max_queue_size();
  config.mutable_layers(0)->mutable_batching()->set_max_batch_size(2000);
  EXPECT_THAT(ValidationError(config), HasSubstr("max_batch_size: 2000 exceeds max_queue_size 1024"));
  config.mutable_layers(0)->mutable_batching()->set_max_batch_size(1024);
  EXPECT_TRUE(ApplyDefaultsAndValidate(&config).ok());
}

TEST(Validate, MaxSequenceLengthLimit) {
  ServerConfig config = OneLayer();
  config.mutable_layers(0)->set_max_sequence_length((int64_t{1} << 20) + 1);
  EXPECT_THAT(ValidationError(config), HasSubstr("layers[0].max_sequence_length: must be <= 1048576, got 1048577"));
  config.mutable_layers(0)->set_max_sequence_length(int64_t{1} << 20);
  EXPECT_TRUE(ApplyDefaultsAndValidate(&config).ok());
}

TEST(Validate, WeightsPathMustExist) {
  ServerConfig config = OneLayer();
  const std::string missing = ::testing::TempDir() + "/no-such-weights.safetensors";
  config.mutable_layers(0)->set_weights_path(missing);
  EXPECT_THAT(ValidationError(config), HasSubstr("layers[0].weights_path: file \"" + missing + "\" not found"));
  config.mutable_layers(0)->set_weights_path(::testing::TempDir());
  EXPECT_THAT(ValidationError(config), HasSubstr("layers[0].weights_path: "));
  // Only existence is checked here; the loader reads the contents.
  config.mutable_layers(0)->set_weights_path(WriteTemp("w.safetensors", "x"));
  EXPECT_TRUE(ApplyDefaultsAndValidate(&config).ok());
}

TEST(Validate, WeightsPrefixNeedsWeightsPath) {
  ServerConfig config = OneLayer();
  config.mutable_layers(0)->set_weights_prefix("encoder.");
  EXPECT_THAT(ValidationError(config), HasSubstr("layers[0].weights_prefix: "));
}

TEST(Validate, Addresses) {
  for (const char* good : {"[::]:50051", "0.0.0.0:0", "localhost:1234", "127.0.0.1:65535", "[::1]:80",
                           "my-host.example.com:443"}) {
    ServerConfig config = OneLayer();
    config.set_grpc_address(good);
    const absl::Status status = ApplyDefaultsAndValidate(&config);
    EXPECT_TRUE(status.ok()) << good << ": " << status;
  }
  for (const char* bad : {"50051", ":50051", "localhost:", "localhost:http", "localhost:65536", "::1:50051",
                          "[::1]50051", "[::1", "[]:1", "unix:/tmp/sock", "host name:1", "localhost:-1"}) {
    ServerConfig config = OneLayer();
    config.set_grpc_address(bad);
    EXPECT_THAT(ValidationError(config), HasSubstr(std::string("grpc_address: must be host:port")))
        << bad;
    config = OneLayer();
    config.set_metrics_address(bad);
    EXPECT_THAT(ValidationError(config), HasSubstr(std::string("metrics_address: must be host:port"))) << bad;
  }
}

TEST(Validate, AddressesMustNotCollide) {
  ServerConfig config = OneLayer();
  config.set_grpc_address("0.0.0.0:9000");
  config.set_metrics_address("localhost:9000");
  EXPECT_THAT(ValidationError(config), HasSubstr("metrics_address: "));
  // Port 0 picks distinct free ports.
  config.set_grpc_address("0.0.0.0:0");
  config.set_metrics_address("0.0.0.0:0");
  EXPECT_TRUE(ApplyDefaultsAndValidate(&config).ok());
}

TEST(Validate, ReportsEveryProblem) {
  ServerConfig config = OneLayer();
  config.set_worker_threads(-3);
  config.mutable_layers(0)->set_num_heads(5);
  const std::string message = ValidationError(config);
  EXPECT_THAT(message, AllOf(HasSubstr("worker_threads: "), HasSubstr("layers[0].num_heads: ")));
}

// ---------------------------------------------------------------------------------------------------
// Flags.

// Parses a command line (without the program name) against a fake environment.
class FlagsTest : public ::testing::Test {
 protected:
  absl::StatusOr<ServerFlags> Parse(std::vector<std::string> args) {
    args.insert(args.begin(), "attnserve");
    std::vector<const char*> argv;
    for (const std::string& a : args) argv.push_back(a.c_str());
    return ParseServerFlags(static_cast<int>(argv.size()), argv.data(), [this](const char* name) -> const char* {
      const auto it = env_.find(name);
      return it == env_.end() ? nullptr : it->second.c_str();
    });
  }
  std::string ErrorOf(std::vector<std::string> args) {
    absl::StatusOr<ServerFlags> flags = Parse(std::move(args));
    EXPECT_EQ(flags.status().code(), absl::StatusCode::kInvalidArgument) << flags.status();
    return std::string(flags.status().message());
  }

  std::map<std::string, std::string> env_;
};

TEST_F(FlagsTest, Defaults) {
  absl::StatusOr<ServerFlags> flags = Parse({});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_EQ(flags->config_path, "");
  EXPECT_FALSE(flags->grpc_address.has_value());
  EXPECT_FALSE(flags->metrics_address.has_value());
  EXPECT_FALSE(flags->worker_threads.has_value());
  EXPECT_EQ(flags->log_level, "info");
  EXPECT_EQ(flags->log_format, "text");
  EXPECT_EQ(flags->shutdown_grace, absl::Seconds(30));
  EXPECT_EQ(flags->access_log, "");
  EXPECT_FALSE(flags->help);
  EXPECT_FALSE(flags->version);
}

TEST_F(FlagsTest, BothForms) {
  absl::StatusOr<ServerFlags> flags =
      Parse({"--config=a.pbtxt", "--grpc-address", "[::]:1", "--metrics-address=localhost:2", "--worker-threads",
             "4", "--log-level=DEBUG", "--log-format", "json", "--shutdown-grace=500ms", "--access-log", "-"});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_EQ(flags->access_log, "-");
  EXPECT_EQ(flags->config_path, "a.pbtxt");
  EXPECT_EQ(flags->grpc_address, "[::]:1");
  EXPECT_EQ(flags->metrics_address, "localhost:2");
  EXPECT_EQ(flags->worker_threads, 4);
  EXPECT_EQ(flags->log_level, "debug");
  EXPECT_EQ(flags->log_format, "json");
  EXPECT_EQ(flags->shutdown_grace, absl::Milliseconds(500));
}

TEST_F(FlagsTest, Durations) {
  const std::vector<std::pair<std::string, absl::Duration>> cases = {
      {"30s", absl::Seconds(30)}, {"500ms", absl::Milliseconds(500)}, {"2m", absl::Minutes(2)},
      {"30", absl::Seconds(30)},  {"0", absl::ZeroDuration()},        {"1.5", absl::Milliseconds(1500)},
      {"1m30s", absl::Seconds(90)}};
  for (const auto& [text, expected] : cases) {
    absl::StatusOr<ServerFlags> flags = Parse({"--shutdown-grace", text});
    ASSERT_TRUE(flags.ok()) << text << ": " << flags.status();
    EXPECT_EQ(flags->shutdown_grace, expected) << text;
  }
}

TEST_F(FlagsTest, EnvironmentVariables) {
  env_ = {{"ATTNSERVE_CONFIG", "e.json"},          {"ATTNSERVE_GRPC_ADDRESS", "localhost:5"},
          {"ATTNSERVE_METRICS_ADDRESS", "localhost:6"}, {"ATTNSERVE_WORKER_THREADS", "8"},
          {"ATTNSERVE_LOG_LEVEL", "warn"},         {"ATTNSERVE_LOG_FORMAT", "json"},
          {"ATTNSERVE_SHUTDOWN_GRACE", "2m"},     {"ATTNSERVE_ACCESS_LOG", "/var/log/attnserve/access.jsonl"}};
  absl::StatusOr<ServerFlags> flags = Parse({});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_EQ(flags->access_log, "/var/log/attnserve/access.jsonl");
  EXPECT_EQ(flags->config_path, "e.json");
  EXPECT_EQ(flags->grpc_address, "localhost:5");
  EXPECT_EQ(flags->metrics_address, "localhost:6");
  EXPECT_EQ(flags->worker_threads, 8);
  EXPECT_EQ(flags->log_level, "warn");
  EXPECT_EQ(flags->log_format, "json");
  EXPECT_EQ(flags->shutdown_grace, absl::Minutes(2));
}

TEST_F(FlagsTest, EmptyEnvironmentVariableIsUnset) {
  env_ = {{"ATTNSERVE_WORKER_THREADS", ""}, {"ATTNSERVE_CONFIG", ""}};
  absl::StatusOr<ServerFlags> flags = Parse({});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_FALSE(flags->worker_threads.has_value());
  EXPECT_EQ(flags->config_path, "");
}

TEST_F(FlagsTest, FlagOverridesEnvironment) {
  env_ = {{"ATTNSERVE_WORKER_THREADS", "8"}, {"ATTNSERVE_LOG_LEVEL", "not-a-level"},
          {"ATTNSERVE_CONFIG", "env.pbtxt"}};
  absl::StatusOr<ServerFlags> flags = Parse({"--worker-threads=2", "--log-level", "error"});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_EQ(flags->worker_threads, 2);
  EXPECT_EQ(flags->log_level, "error") << "a bad variable overridden by a flag is no error";
  EXPECT_EQ(flags->config_path, "env.pbtxt");
}

TEST_F(FlagsTest, LastRepeatedFlagWins) {
  absl::StatusOr<ServerFlags> flags = Parse({"--worker-threads=2", "--worker-threads=3"});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_EQ(flags->worker_threads, 3);
}

TEST_F(FlagsTest, ZeroWorkerThreadsMeansOnePerCpu) {
  absl::StatusOr<ServerFlags> flags = Parse({"--worker-threads=0"});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_EQ(flags->worker_threads, 0);
  ServerConfig config = OneLayer();
  config.set_worker_threads(4);
  ApplyFlagsToConfig(*flags, &config);
  EXPECT_EQ(config.worker_threads(), 0);
}

TEST_F(FlagsTest, BadInteger) {
  EXPECT_THAT(ErrorOf({"--worker-threads=abc"}), AllOf(HasSubstr("--worker-threads"), HasSubstr("\"abc\"")));
  EXPECT_THAT(ErrorOf({"--worker-threads", "3x"}), AllOf(HasSubstr("--worker-threads"), HasSubstr("\"3x\"")));
  EXPECT_THAT(ErrorOf({"--worker-threads=-1"}),
              AllOf(HasSubstr("between 0 (one per CPU) and 256"), HasSubstr("\"-1\"")));
  EXPECT_THAT(ErrorOf({"--worker-threads=257"}),
              AllOf(HasSubstr("between 0 (one per CPU) and 256"), HasSubstr("\"257\"")));
  EXPECT_THAT(ErrorOf({"--worker-threads=99999999999"}), HasSubstr("--worker-threads"));
  env_ = {{"ATTNSERVE_WORKER_THREADS", "many"}};
  EXPECT_THAT(ErrorOf({}), AllOf(HasSubstr("ATTNSERVE_WORKER_THREADS"), HasSubstr("\"many\"")));
}

TEST_F(FlagsTest, BadDuration) {
  for (const char* bad : {"soon", "30x", "-5s", "-1", "inf", "nan", "10 s"}) {
    EXPECT_THAT(ErrorOf({std::string("--shutdown-grace=") + bad}),
                AllOf(HasSubstr("--shutdown-grace"), HasSubstr(std::string("\"") + bad + "\"")));
  }
  env_ = {{"ATTNSERVE_SHUTDOWN_GRACE", "later"}};
  EXPECT_THAT(ErrorOf({}), AllOf(HasSubstr("ATTNSERVE_SHUTDOWN_GRACE"), HasSubstr("\"later\"")));
}

TEST_F(FlagsTest, BadWords) {
  EXPECT_THAT(ErrorOf({"--log-level=loud"}), AllOf(HasSubstr("--log-level"), HasSubstr("\"loud\"")));
  EXPECT_THAT(ErrorOf({"--log-format=xml"}), AllOf(HasSubstr("--log-format"), HasSubstr("\"xml\"")));
}

TEST_F(FlagsTest, BadAddress) {
  EXPECT_THAT(ErrorOf({"--grpc-address=50051"}), AllOf(HasSubstr("--grpc-address"), HasSubstr("\"50051\"")));
  env_ = {{"ATTNSERVE_METRICS_ADDRESS", "nohost"}};
  EXPECT_THAT(ErrorOf({}), AllOf(HasSubstr("ATTNSERVE_METRICS_ADDRESS"), HasSubstr("\"nohost\"")));
}

TEST_F(FlagsTest, UnknownFlagAndStrayArguments) {
  EXPECT_THAT(ErrorOf({"--port=1"}), HasSubstr("unknown flag \"--port\""));
  EXPECT_THAT(ErrorOf({"--confi", "x"}), HasSubstr("unknown flag \"--confi\""));
  EXPECT_THAT(ErrorOf({"config.pbtxt"}), HasSubstr("\"config.pbtxt\""));
  EXPECT_THAT(ErrorOf({"-v"}), HasSubstr("\"-v\""));
}

TEST_F(FlagsTest, MissingOrEmptyValues) {
  EXPECT_THAT(ErrorOf({"--config"}), HasSubstr("--config: missing value"));
  EXPECT_THAT(ErrorOf({"--config", "--worker-threads=2"}), HasSubstr("--config: missing value"));
  EXPECT_THAT(ErrorOf({"--grpc-address="}), HasSubstr("--grpc-address: empty value"));
  EXPECT_THAT(ErrorOf({"--help=yes"}), HasSubstr("--help takes no value"));
}

TEST_F(FlagsTest, HelpAndVersion) {
  absl::StatusOr<ServerFlags> flags = Parse({"--help"});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_TRUE(flags->help);
  flags = Parse({"-h"});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_TRUE(flags->help);
  flags = Parse({"--version"});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_TRUE(flags->version);
  EXPECT_FALSE(flags->help);
  // Help still works when a value is broken, so users can find out how to fix it.
  env_ = {{"ATTNSERVE_WORKER_THREADS", "many"}};
  flags = Parse({"--shutdown-grace=soon", "--help"});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_TRUE(flags->help);
}

TEST(ServerUsage, ListsEveryFlagWithItsVariableAndDefault) {
  const std::string usage = ServerUsage();
  for (const char* text :
       {"--config", "ATTNSERVE_CONFIG", "--grpc-address", "ATTNSERVE_GRPC_ADDRESS", "0.0.0.0:50051",
        "--metrics-address", "ATTNSERVE_METRICS_ADDRESS", "0.0.0.0:9464", "--worker-threads",
        "ATTNSERVE_WORKER_THREADS", "--log-level", "ATTNSERVE_LOG_LEVEL", "trace|debug|info|warn|error|off",
        "--log-format", "ATTNSERVE_LOG_FORMAT", "text|json", "--shutdown-grace", "ATTNSERVE_SHUTDOWN_GRACE",
        "30s", "--help", "-h", "--version"}) {
    EXPECT_THAT(usage, HasSubstr(text));
  }
}

// ---------------------------------------------------------------------------------------------------
// BuildServerConfig: file + flags + defaults + validation.

TEST(BuildServerConfig, EmbeddedDefaultWithoutConfigFlag) {
  absl::StatusOr<ServerConfig> config = BuildServerConfig(ServerFlags());
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_EQ(config->layers_size(), 2);
  EXPECT_EQ(config->grpc_address(), "0.0.0.0:50051");
  EXPECT_EQ(config->layers(0).batching().max_batch_size(), 32);
}

TEST(BuildServerConfig, FlagsOverrideTheFile) {
  ServerFlags flags;
  flags.config_path = WriteTemp("override.pbtxt", kPbtxt);
  flags.grpc_address = "0.0.0.0:0";
  flags.worker_threads = 6;
  absl::StatusOr<ServerConfig> config = BuildServerConfig(flags);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->grpc_address(), "0.0.0.0:0");           // flag over the file's localhost:1234
  EXPECT_EQ(config->worker_threads(), 6);                   // flag over the file's 2
  EXPECT_EQ(config->metrics_address(), "0.0.0.0:9464");     // neither: the default
  EXPECT_EQ(config->layers(0).name(), "enc.0");
  EXPECT_EQ(config->layers(0).kdim(), 64);
  EXPECT_EQ(config->layers(0).vdim(), 128);                 // defaulted
  EXPECT_EQ(config->layers(0).batching().max_queue_delay_us(), 200);

  flags.grpc_address.reset();
  flags.worker_threads.reset();
  config = BuildServerConfig(flags);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->grpc_address(), "localhost:1234");
  EXPECT_EQ(config->worker_threads(), 2);
}

TEST(BuildServerConfig, ErrorsNameTheSource) {
  ServerFlags flags;
  flags.config_path = WriteTemp("invalid.pbtxt", "layers { name: \"x\" embed_dim: 10 num_heads: 3 }\n");
  absl::StatusOr<ServerConfig> config = BuildServerConfig(flags);
  ASSERT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(config.status().message(),
              AllOf(HasSubstr(flags.config_path), HasSubstr("layers[0].num_heads: 3 does not divide embed_dim 10")));

  flags.config_path = ::testing::TempDir() + "/missing.json";
  EXPECT_EQ(BuildServerConfig(flags).status().code(), absl::StatusCode::kNotFound);
}

TEST(BuildServerConfig, FromParsedCommandLine) {
  const std::string path = WriteTemp("cli.json", kJson);
  const std::string config_arg = "--config=" + path;
  const char* argv[] = {"attnserve", config_arg.c_str(), "--metrics-address", "127.0.0.1:0"};
  absl::StatusOr<ServerFlags> flags =
      ParseServerFlags(4, argv, [](const char* name) -> const char* {
        return std::string(name) == "ATTNSERVE_WORKER_THREADS" ? "5" : nullptr;
      });
  ASSERT_TRUE(flags.ok()) << flags.status();
  absl::StatusOr<ServerConfig> config = BuildServerConfig(*flags);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->metrics_address(), "127.0.0.1:0");
  EXPECT_EQ(config->worker_threads(), 5);
  EXPECT_EQ(config->grpc_address(), "localhost:1234");
}

}  // namespace
}  // namespace attnserve

// ---------------------------------------------------------------------------------------------------
// The security and transport sections, and their flags.

namespace attnserve {
namespace {

TEST(SecurityAndTransport, DefaultsFillEveryLimit) {
  ServerConfig config = DefaultServerConfig();
  ASSERT_TRUE(ApplyDefaultsAndValidate(&config).ok());
  const auto& t = config.transport();
  EXPECT_EQ(t.max_concurrent_streams(), 128);
  EXPECT_EQ(t.max_connection_idle_ms(), 120000);
  EXPECT_EQ(t.keepalive_min_ping_interval_ms(), 10000);
  EXPECT_EQ(t.max_ping_strikes(), 2);
  EXPECT_EQ(t.grpc_memory_bytes(), 0);  // follows the memory budget
  EXPECT_EQ(t.grpc_max_threads(), 256);
  EXPECT_EQ(t.max_metadata_bytes(), 16384);
  EXPECT_EQ(t.listener_check_interval_ms(), 5000);
  EXPECT_EQ(t.memory_guard_interval_ms(), 50);
  EXPECT_EQ(t.stalled_read_timeout_ms(), 3000);
  EXPECT_EQ(t.max_connections(), 0);  // follows the file limit
  EXPECT_EQ(MaxConnections(t, 1 << 20), 10000);
  EXPECT_EQ(MaxConnections(t, 1024), 768);
  EXPECT_EQ(config.security().tls_reload_interval_ms(), 10000);
  EXPECT_TRUE(config.security().tls_cert_file().empty());
  EXPECT_EQ(GrpcMemoryBytes(t, int64_t{8} << 30), int64_t{4} << 30);    // half the budget
  EXPECT_EQ(GrpcMemoryBytes(t, int64_t{96} << 20), int64_t{64} << 20);  // at least 64 MiB
}

TEST(SecurityAndTransport, ProblemsNameTheirFields) {
  ServerConfig config = DefaultServerConfig();
  config.mutable_security()->set_tls_cert_file("/nonexistent/cert.pem");
  config.mutable_security()->set_tls_client_ca_file("/nonexistent/ca.pem");
  config.mutable_security()->set_auth_token_file("/nonexistent/tokens");
  config.mutable_transport()->set_max_ping_strikes(-1);
  config.mutable_transport()->set_listener_check_interval_ms(-2);
  config.mutable_transport()->set_memory_guard_interval_ms(-3);
  config.mutable_transport()->set_max_connections(-2);
  config.mutable_transport()->set_stalled_read_timeout_ms(-4);
  config.set_health_address("nowhere");
  const absl::Status status = ApplyDefaultsAndValidate(&config);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  for (const char* text : {"security.tls_key_file: tls_cert_file and tls_key_file go together",
                           "security.tls_cert_file: \"/nonexistent/cert.pem\" is not a readable file",
                           "security.auth_token_file: \"/nonexistent/tokens\" is not a readable file",
                           "transport.max_ping_strikes: must be >= 0, got -1",
                           "transport.listener_check_interval_ms: must be -1 (never) or >= 0, got -2",
                           "transport.memory_guard_interval_ms: must be -1 (never) or >= 0, got -3",
                           "transport.max_connections: must be -1 (no cap) or >= 0, got -2",
                           "transport.stalled_read_timeout_ms: must be -1 (never) or >= 0, got -4",
                           "health_address: "}) {
    EXPECT_THAT(std::string(status.message()), HasSubstr(text));
  }
  ServerConfig huge = DefaultServerConfig();
  huge.mutable_layers(0)->set_embed_dim(int64_t{1} << 32);
  huge.mutable_layers(0)->set_num_heads(1);
  EXPECT_THAT(std::string(ApplyDefaultsAndValidate(&huge).message()),
              HasSubstr("layers[0].embed_dim: must be at most 32768, got 4294967296"));
  ServerConfig ca_only = DefaultServerConfig();
  ca_only.mutable_security()->set_tls_client_ca_file(WriteTemp("ca.pem", "x"));
  EXPECT_THAT(std::string(ApplyDefaultsAndValidate(&ca_only).message()),
              HasSubstr("security.tls_client_ca_file: needs tls_cert_file"));
}

TEST_F(FlagsTest, SecurityAndTransportFlagsOverrideTheirFields) {
  env_["ATTNSERVE_AUTH_TOKEN_FILE"] = "/etc/tokens";
  absl::StatusOr<ServerFlags> flags = Parse({"--tls-cert-file",
                                             "c.pem",
                                             "--tls-key-file=k.pem",
                                             "--tls-client-ca-file",
                                             "ca.pem",
                                             "--metrics-auth-file",
                                             "m",
                                             "--disable-reflection",
                                             "--max-concurrent-streams",
                                             "64",
                                             "--max-connection-idle",
                                             "30s",
                                             "--keepalive-min-ping-interval=1m",
                                             "--max-ping-strikes",
                                             "5",
                                             "--grpc-memory-bytes",
                                             "1048576",
                                             "--listener-check-interval",
                                             "never",
                                             "--memory-guard-interval",
                                             "20ms",
                                             "--max-connections",
                                             "500",
                                             "--health-address",
                                             "0.0.0.0:8081",
                                             "--stalled-read-timeout",
                                             "never",
                                             "--grpc-max-threads",
                                             "32"});
  ASSERT_TRUE(flags.ok()) << flags.status();
  ServerConfig config = DefaultServerConfig();
  config.mutable_transport()->set_max_metadata_bytes(999);  // a field no flag set stays
  ApplyFlagsToConfig(*flags, &config);
  EXPECT_EQ(config.security().tls_cert_file(), "c.pem");
  EXPECT_EQ(config.security().tls_key_file(), "k.pem");
  EXPECT_EQ(config.security().tls_client_ca_file(), "ca.pem");
  EXPECT_EQ(config.security().auth_token_file(), "/etc/tokens");
  EXPECT_EQ(config.security().metrics_auth_file(), "m");
  EXPECT_TRUE(config.security().disable_reflection());
  EXPECT_EQ(config.transport().max_concurrent_streams(), 64);
  EXPECT_EQ(config.transport().max_connection_idle_ms(), 30000);
  EXPECT_EQ(config.transport().keepalive_min_ping_interval_ms(), 60000);
  EXPECT_EQ(config.transport().max_ping_strikes(), 5);
  EXPECT_EQ(config.transport().grpc_memory_bytes(), 1048576);
  EXPECT_EQ(config.transport().listener_check_interval_ms(), -1);
  EXPECT_EQ(config.transport().memory_guard_interval_ms(), 20);
  EXPECT_EQ(config.transport().max_connections(), 500);
  EXPECT_EQ(config.transport().stalled_read_timeout_ms(), -1);
  EXPECT_EQ(config.transport().max_metadata_bytes(), 999);
  EXPECT_EQ(config.transport().grpc_max_threads(), 32);
  absl::StatusOr<ServerFlags> metadata = Parse({"--max-metadata-bytes", "8192"});
  ASSERT_TRUE(metadata.ok()) << metadata.status();
  ApplyFlagsToConfig(*metadata, &config);
  EXPECT_EQ(config.transport().max_metadata_bytes(), 8192);
  EXPECT_EQ(config.health_address(), "0.0.0.0:8081");
}

TEST_F(FlagsTest, BadTransportValuesNameTheFlag) {
  EXPECT_THAT(ErrorOf({"--max-concurrent-streams", "0"}), HasSubstr("--max-concurrent-streams: expected an integer"));
  EXPECT_THAT(ErrorOf({"--max-connection-idle", "0"}), HasSubstr("--max-connection-idle: expected at least 1ms"));
  EXPECT_THAT(ErrorOf({"--listener-check-interval", "soon"}), HasSubstr("--listener-check-interval"));
  EXPECT_THAT(ErrorOf({"--memory-guard-interval", "0"}), HasSubstr("--memory-guard-interval"));
  EXPECT_THAT(ErrorOf({"--health-address", "x"}), HasSubstr("--health-address"));
}

}  // namespace
}  // namespace attnserve

namespace attnserve {
namespace {

// A reload applies the layers only; the warning names the other fields it changed. worker_threads compares by
// the count it resolves to: 0 (one per CPU) on 2 CPUs and an explicit 2 are the same layout.
TEST(FieldsNeedingRestart, NamesChangedFieldsButNotLayersOrEqualWorkerCounts) {
  v1::ServerConfig served;
  served.set_grpc_address("0.0.0.0:50051");
  served.add_layers()->set_name("a");
  v1::ServerConfig loaded = served;
  loaded.add_layers()->set_name("b");
  EXPECT_THAT(FieldsNeedingRestart(served, loaded, /*resolved_workers=*/2, /*cpus=*/2), testing::IsEmpty());
  loaded.set_worker_threads(2);
  EXPECT_THAT(FieldsNeedingRestart(served, loaded, 2, 2), testing::IsEmpty());
  loaded.set_worker_threads(1);
  loaded.set_grpc_address("0.0.0.0:50052");
  loaded.mutable_transport()->set_max_connections(7);
  EXPECT_THAT(FieldsNeedingRestart(served, loaded, 2, 2),
              testing::UnorderedElementsAre("grpc_address", "worker_threads", "transport"));
  served.set_worker_threads(1);
  loaded = served;
  loaded.set_worker_threads(0);  // back to one per CPU: 2 on 2 CPUs, not the 1 served
  EXPECT_THAT(FieldsNeedingRestart(served, loaded, 1, 2), testing::ElementsAre("worker_threads"));
}

}  // namespace
}  // namespace attnserve
