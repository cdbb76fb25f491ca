// End-to-end tests of the client side against real processes: attnserve::Client, attnctl (exit codes,
// --json, .npy files) and attnbench (closed and open loop, several servers round-robin, the echo server).
// One attnserve on ephemeral loopback ports serves most tests; tests that need more start their own.
#include <netinet/in.h>
#include <omp.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/session_client.h"
#include "tools/npy.h"
#include "core/attention_inputs.h"
#include "core/mha_weights.h"
#include "core/multihead_attention.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/http_get.h"
#include "tests/testing/subprocess.h"

#if !defined(ATTNSERVE_BINARY) || !defined(ATTNCTL_BINARY) || !defined(ATTNBENCH_BINARY) || \
    !defined(ECHO_SERVER_BINARY)
#error "tests/CMakeLists.txt passes the attnserve, attnctl, attnbench and echo server paths"
#endif

namespace attnserve {
namespace {

namespace at = attnserve::testing;
using ::testing::HasSubstr;

constexpr absl::Duration kStartTimeout = absl::Seconds(60);
constexpr absl::Duration kToolTimeout = absl::Seconds(120);
constexpr double kTolerance = 1e-5;

std::string TempPath(const std::string& name) {
  static const std::string dir = [] {
    auto p = std::filesystem::path(::testing::TempDir()) / absl::StrCat("attnserve_client_integ_", getpid());
    std::filesystem::create_directories(p);
    return p.string();
  }();
  return dir + "/" + name;
}

// ---------------------------------------------------------------------------------------------------
// Processes.

struct Server {
  std::unique_ptr<at::Subprocess> process;
  int grpc_port = 0;
  int metrics_port = 0;
  std::string target() const { return absl::StrCat("127.0.0.1:", grpc_port); }

  // Sum of attnserve_requests_total over every label set, or -1 when /metrics cannot be read.
  double RequestsTotal() const {
    auto body = at::HttpGet("127.0.0.1", metrics_port, "/metrics");
    if (!body.ok()) return -1;
    double total = 0;
    for (absl::string_view line : absl::StrSplit(*body, '\n')) {
      if (!absl::StartsWith(line, "attnserve_requests_total{")) continue;
      double v = 0;
      if (absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &v)) total += v;
    }
    return total;
  }
};

std::unique_ptr<Server> StartServer(const std::string& name) {
  auto server = std::make_unique<Server>();
  auto process = at::Subprocess::Start({ATTNSERVE_BINARY, "--grpc-address", "127.0.0.1:0", "--metrics-address",
                                        "127.0.0.1:0"},
                                       TempPath(name + ".log"));
  if (!process.ok()) {
    ADD_FAILURE() << process.status();
    return nullptr;
  }
  server->process = std::move(*process);
  auto ports = server->process->WaitForLogRegex(R"(ready: grpc_port=(\d+) metrics_port=(\d+))", kStartTimeout);
  if (!ports.ok()) {
    ADD_FAILURE() << ports.status();
    return nullptr;
  }
  server->grpc_port = std::stoi((*ports)[1]);
  server->metrics_port = std::stoi((*ports)[2]);
  return server;
}

struct ToolResult {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Runs a tool to completion: stdout is the Subprocess log, stderr goes to a file of its own (through sh).
ToolResult RunTool(const std::string& binary, const std::vector<std::string>& args) {
  static int counter = 0;
  const std::string base = TempPath(absl::StrCat("tool", ++counter));
  std::vector<std::string> argv = {"/bin/sh", "-c", absl::StrCat("exec \"$0\" \"$@\" 2>'", base, ".err'"), binary};
  argv.insert(argv.end(), args.begin(), args.end());
  ToolResult result;
  auto process = at::Subprocess::Start(argv, base + ".out");
  if (!process.ok()) {
    ADD_FAILURE() << process.status();
    return result;
  }
  auto code = (*process)->WaitForExit(kToolTimeout);
  if (!code.ok()) {
    ADD_FAILURE() << binary << " did not finish: " << code.status();
    return result;
  }
  result.exit_code = *code;
  result.out = (*process)->ReadLog();
  result.err = ReadFile(base + ".err");
  return result;
}

ToolResult Attnctl(const std::vector<std::string>& args) { return RunTool(ATTNCTL_BINARY, args); }
ToolResult Attnbench(const std::vector<std::string>& args) { return RunTool(ATTNBENCH_BINARY, args); }

nlohmann::json ParseJson(const ToolResult& r) {
  auto j = nlohmann::json::parse(r.out, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(j.is_discarded()) << "not JSON:\n" << r.out << "\nstderr:\n" << r.err;
  return j;
}

// A loopback port nothing listens on: bound, then released.
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ADD_FAILURE() << "cannot bind a loopback port";
  }
  close(fd);
  return ntohs(addr.sin_port);
}

// ---------------------------------------------------------------------------------------------------
// The in-process twin of the default config's "small" layer.

const MultiheadAttention& SmallEngine() {
  static const MultiheadAttention* engine = [] {
    MultiheadAttention::Options options;
    options.config.embed_dim = 256;
    options.config.num_heads = 4;
    auto e = MultiheadAttention::Create(options, RandomMhaWeights(options.config, /*seed=*/1));
    if (!e.ok()) std::abort();
    return e->release();
  }();
  return *engine;
}

std::vector<float> RandomValues(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

void ExpectNear(const std::vector<float>& actual, const std::vector<float>& expected, const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (size_t i = 0; i < actual.size(); ++i) {
    ASSERT_NEAR(actual[i], expected[i], kTolerance * (1 + std::fabs(expected[i]))) << what << " at " << i;
  }
}

class ClientIntegrationTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    omp_set_num_threads(1);  // the reference computations are tiny; a thread team only adds waits
    server_ = StartServer("server").release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override { ASSERT_NE(server_, nullptr) << "the shared server did not start"; }

  static std::unique_ptr<Client> NewClient(const std::string& target) {
    Client::Options o;
    o.target = target;
    auto c = Client::Create(o);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }

  static Server* server_;
};
Server* ClientIntegrationTest::server_ = nullptr;

// ---------------------------------------------------------------------------------------------------
// attnserve::Client

TEST_F(ClientIntegrationTest, InferEqualsTheInProcessEngine) {
  auto client = NewClient(server_->target());
  const std::vector<int64_t> q_shape = {2, 7, 256}, kv_shape = {2, 5, 256};
  const std::vector<float> q = RandomValues(2 * 7 * 256, 1);
  const std::vector<float> kv = RandomValues(2 * 5 * 256, 2);
  const std::vector<uint8_t> kpm = {0, 0, 0, 1, 1, 0, 0, 0, 0, 1};

  // Self-attention.
  auto self = client->Infer("small", q, q_shape);
  ASSERT_TRUE(self.ok()) << self.status();
  AttentionInputs in;
  in.query = TensorView::F32(q.data(), q_shape);
  auto expected = SmallEngine().Forward(in);
  ASSERT_TRUE(expected.ok()) << expected.status();
  EXPECT_EQ(self->output.shape, expected->output.shape);
  ExpectNear(self->output.values, expected->output.values, "self-attention output");
  EXPECT_GE(self->timing.batch_size, 1);
  EXPECT_GT(self->timing.compute_us, 0);

  // Cross-attention with a bool key padding mask, causal, per-head weights.
  Client::InferOptions options;
  options.key = {kv, kv_shape};
  options.value = {kv, kv_shape};
  options.key_padding_mask = Client::MaskInput::Bool(kpm, {2, 5});
  options.is_causal = true;
  options.need_weights = true;
  options.average_attn_weights = false;
  options.id = "cross";
  auto cross = client->Infer("small", q, q_shape, options);
  ASSERT_TRUE(cross.ok()) << cross.status();
  in.key = TensorView::F32(kv.data(), kv_shape);
  in.value = TensorView::F32(kv.data(), kv_shape);
  in.key_padding_mask = TensorView::Bool(kpm.data(), {2, 5});
  in.is_causal = true;
  in.need_weights = true;
  in.average_attn_weights = false;
  expected = SmallEngine().Forward(in);
  ASSERT_TRUE(expected.ok()) << expected.status();
  ExpectNear(cross->output.values, expected->output.values, "cross-attention output");
  EXPECT_EQ(cross->attn_weights.shape, expected->attn_weights.shape);
  ExpectNear(cross->attn_weights.values, expected->attn_weights.values, "attention weights");
  EXPECT_EQ(cross->id, "cross");
}

TEST_F(ClientIntegrationTest, HealthLayersAndErrors) {
  auto client = NewClient(server_->target());
  auto health = client->Health();
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, Client::HealthStatus::kServing);
  EXPECT_EQ(*client->Health("attnserve.v1.AttentionService"), Client::HealthStatus::kServing);
  EXPECT_EQ(client->Health("no.such.Service").status().code(), absl::StatusCode::kNotFound);

  auto layers = client->ListLayers();
  ASSERT_TRUE(layers.ok()) << layers.status();
  std::vector<std::string> names;
  for (const auto& l : *layers) names.push_back(l.config().name());
  EXPECT_THAT(names, ::testing::UnorderedElementsAre("small", "base"));
  auto small = client->GetLayer("small");
  ASSERT_TRUE(small.ok());
  EXPECT_EQ(small->config().embed_dim(), 256);
  EXPECT_EQ(client->GetLayer("nope").status().code(), absl::StatusCode::kNotFound);

  const std::vector<float> q(3 * 100, 0.5f);
  auto bad = client->Infer("small", q, {1, 3, 100});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client->Infer("nope", q, {1, 3, 100}).status().code(), absl::StatusCode::kNotFound);

  auto down = NewClient(absl::StrCat("127.0.0.1:", FreePort()));
  EXPECT_EQ(down->Health().status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(ClientIntegrationTest, ErrorsEndInTheServersTraceId) {
  const std::vector<float> q(3 * 256, 0.5f);
  auto client = NewClient(server_->target());
  const absl::Status fresh = client->Infer("nope", q, {1, 3, 256}).status();
  EXPECT_EQ(fresh.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(fresh.message()), ::testing::ContainsRegex("\\[trace_id [0-9a-f]{32}\\]$"));

  Client::Options o;
  o.target = server_->target();
  o.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  auto traced = Client::Create(o);
  ASSERT_TRUE(traced.ok()) << traced.status();
  EXPECT_THAT(std::string((*traced)->GetLayer("nope").status().message()),
              HasSubstr("[trace_id 4bf92f3577b34da6a3ce929d0e0e4736]"));
  Client::InferOptions per_call;
  per_call.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  EXPECT_THAT(std::string((*traced)->Infer("nope", q, {1, 3, 256}, per_call).status().message()),
              HasSubstr("[trace_id 0af7651916cd43dd8448eb211c80319c]"));

  const std::string target = "--target=" + server_->target();
  ToolResult r = Attnctl({target, "--traceparent", o.traceparent, "infer", "nope"});
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_THAT(r.err, HasSubstr("trace_id 4bf92f3577b34da6a3ce929d0e0e4736"));
  r = Attnctl({target, "--traceparent", "not-a-trace", "list"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("traceparent: expected"));
}

// ---------------------------------------------------------------------------------------------------
// attnctl

TEST_F(ClientIntegrationTest, AttnctlCommandsExitCodesAndJson) {
  const std::string target = "--target=" + server_->target();

  ToolResult r = Attnctl({target, "health"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "SERVING\n");
  r = Attnctl({target, "--json", "health"});
  EXPECT_EQ(ParseJson(r)["status"], "SERVING");

  r = Attnctl({target, "--json", "list"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  nlohmann::json j = ParseJson(r);
  ASSERT_EQ(j["layers"].size(), 2u);
  EXPECT_EQ(j["layers"][0]["config"]["name"], "small");
  r = Attnctl({target, "list"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, HasSubstr("small"));

  r = Attnctl({target, "describe", "small", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  j = ParseJson(r);
  EXPECT_EQ(j["config"]["embed_dim"], "256");  // proto3 JSON writes int64 as a string
  EXPECT_EQ(j["ready"], true);

  r = Attnctl({target, "infer", "small", "--batch", "2", "--seq", "9", "--need-weights", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  j = ParseJson(r);
  EXPECT_EQ(j["output"]["shape"], nlohmann::json({2, 9, 256}));
  EXPECT_EQ(j["attn_weights"]["shape"], nlohmann::json({2, 9, 9}));
  EXPECT_EQ(j["output"]["nan"], 0);
  EXPECT_NEAR(j["attn_weights"]["mean"].get<double>(), 1.0 / 9, 1e-4);  // rows sum to one
  EXPECT_GE(j["timing"]["batch_size"].get<int>(), 1);

  r = Attnctl({target, "infer", "small", "--kv-seq", "4", "--causal"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("output: shape [1, 16, 256]"));
}

TEST_F(ClientIntegrationTest, AttnctlErrorsTellTheUserWhatIsWrong) {
  const std::string target = "--target=" + server_->target();
  ToolResult r = Attnctl({target, "describe", "nope"});
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_THAT(r.err, HasSubstr("NOT_FOUND"));
  EXPECT_THAT(r.err, HasSubstr("attnctl list"));
  r = Attnctl({target, "infer", "nope", "--json"});
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_EQ(ParseJson(r)["error"]["code"], "NOT_FOUND");

  r = Attnctl({target, "infer", "small", "--seq", "5000"});  // past max_sequence_length 4096
  EXPECT_EQ(r.exit_code, 4);
  EXPECT_THAT(r.err, HasSubstr("INVALID_ARGUMENT"));
  EXPECT_THAT(r.err, HasSubstr("max_sequence_length"));

  // The flag reaches the server: a multi-head attention layer has no rotary positions.
  r = Attnctl({target, "infer", "small", "--position-offset", "3"});
  EXPECT_EQ(r.exit_code, 4);
  EXPECT_THAT(r.err, HasSubstr("position_offset: only DECODER_ATTENTION layers take rotary positions"));

  const std::string wrong_e = TempPath("wrong_e.npy");
  ASSERT_TRUE(WriteNpyFloat32(wrong_e, std::vector<float>(2 * 3 * 100), std::vector<int64_t>{2, 3, 100}).ok());
  r = Attnctl({target, "infer", "small", "--query", wrong_e});
  EXPECT_EQ(r.exit_code, 4);
  EXPECT_THAT(r.err, HasSubstr("query"));

  const std::string down = absl::StrCat("--target=127.0.0.1:", FreePort());
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {down, "health"}, {down, "list"}, {down, "infer", "small"}, {down, "--json", "describe", "small"}}) {
    r = Attnctl(args);
    EXPECT_EQ(r.exit_code, 2) << args[1];
    EXPECT_THAT(r.err, HasSubstr("cannot reach attnserve")) << args[1];
  }

  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {}, {"frobnicate"}, {"infer"}, {"list", "extra"}, {"--nope", "list"}, {"list", "--seq", "4"},
           {"infer", "small", "--position-offset", "-1"},
           {target, "infer", "small", "--query", TempPath("missing.npy")}, {"infer", "small", "--key", "k.npy"}}) {
    r = Attnctl(args);
    EXPECT_EQ(r.exit_code, 1) << absl::StrJoin(args, " ");
    EXPECT_THAT(r.err, HasSubstr("attnctl: ")) << absl::StrJoin(args, " ");
  }
  r = Attnctl({"--help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, HasSubstr("Exit status"));
}

TEST_F(ClientIntegrationTest, AttnctlNpyInputAndOutputRoundTrip) {
  const std::string target = "--target=" + server_->target();
  const std::vector<int64_t> shape = {3, 5, 256};
  const std::vector<float> q = RandomValues(3 * 5 * 256, 7);
  const std::string q_path = TempPath("q.npy"), out_path = TempPath("out.npy"), w_path = TempPath("w.npy");
  ASSERT_TRUE(WriteNpyFloat32(q_path, q, shape).ok());

  ToolResult r = Attnctl({target, "infer", "small", "--query", q_path, "--causal", "--need-weights", "--output",
                          out_path, "--weights-output", w_path});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("saved " + out_path));

  AttentionInputs in;
  in.query = TensorView::F32(q.data(), shape);
  in.is_causal = true;
  in.need_weights = true;
  auto expected = SmallEngine().Forward(in);
  ASSERT_TRUE(expected.ok());
  auto out = ReadNpy(out_path);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->shape, expected->output.shape);
  ExpectNear(out->floats, expected->output.values, "output.npy");
  auto w = ReadNpy(w_path);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->shape, expected->attn_weights.shape);
  ExpectNear(w->floats, expected->attn_weights.values, "weights.npy");
}

// ---------------------------------------------------------------------------------------------------
// attnbench

// Every step: something answered, nothing failed, percentiles in order.
void ExpectSaneSteps(const nlohmann::json& steps, size_t count) {
  ASSERT_TRUE(steps.is_array());
  ASSERT_EQ(steps.size(), count) << steps.dump(2);
  for (const auto& s : steps) {
    EXPECT_GT(s["requests"].get<int64_t>(), 0) << s.dump(2);
    EXPECT_EQ(s["errors"].get<int64_t>(), 0) << s.dump(2);
    EXPECT_GT(s["requests_per_second"].get<double>(), 0);
    const auto& l = s["latency_ms"];
    EXPECT_GT(l["p50"].get<double>(), 0);
    EXPECT_LE(l["min"].get<double>(), l["p50"].get<double>());
    EXPECT_LE(l["p50"].get<double>(), l["p90"].get<double>());
    EXPECT_LE(l["p90"].get<double>(), l["p99"].get<double>());
    EXPECT_LE(l["p99"].get<double>(), l["p99_9"].get<double>());
    EXPECT_LE(l["p99_9"].get<double>(), l["max"].get<double>());
  }
}

TEST_F(ClientIntegrationTest, AttnbenchClosedLoopSweep) {
  ToolResult r = Attnbench({"--target", server_->target(), "--concurrency", "1,4", "--duration", "2s", "--warmup",
                            "500ms", "--seq", "16", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json steps = ParseJson(r);
  ExpectSaneSteps(steps, 2);
  EXPECT_EQ(steps[0]["concurrency"], 1);
  EXPECT_EQ(steps[1]["concurrency"], 4);
  for (const auto& s : steps) {
    EXPECT_EQ(s["server"]["samples"], s["ok"]);  // every answer carried the server's timing
    EXPECT_GE(s["server"]["batch_size"]["mean"].get<double>(), 1.0);
  }
  EXPECT_EQ(steps[0]["server"]["batch_size"]["max"].get<double>(), 1.0);  // one request in flight
  EXPECT_TRUE(r.err.empty()) << r.err;  // no progress line for a --duration of 2 s or less
}

TEST_F(ClientIntegrationTest, AttnbenchOpenLoop) {
  ToolResult r = Attnbench({"--target", server_->target(), "--rate", "100", "--duration", "3", "--warmup", "0.5",
                            "--seq", "16", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json steps = ParseJson(r);
  ExpectSaneSteps(steps, 1);
  EXPECT_EQ(steps[0]["mode"], "open");
  EXPECT_EQ(steps[0]["requests"], 300);  // 3 s at 100/s, sent at fixed times whatever the answers do
  EXPECT_THAT(r.err, HasSubstr("attnbench rate=100: "));  // the progress line of a run longer than 2 s
}

TEST_F(ClientIntegrationTest, AttnbenchStreamsWithDrawnLengthsAndReportsCsv) {
  ToolResult r = Attnbench({"--target", server_->target(), "--stream", "--concurrency", "3", "--duration", "1",
                            "--warmup", "0", "--seq-dist", "uniform:8:64", "--csv"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<std::string> lines = absl::StrSplit(r.out, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 2u) << r.out;
  EXPECT_THAT(lines[1], HasSubstr("small B=1 L=uniform:8:64 stream,closed,3,"));
  const std::vector<std::string> row = absl::StrSplit(lines[1], ',');
  int64_t requests = 0, errors = 0;
  ASSERT_TRUE(absl::SimpleAtoi(row[5], &requests));
  ASSERT_TRUE(absl::SimpleAtoi(row[7], &errors));
  EXPECT_GT(requests, 0);
  EXPECT_EQ(errors, 0);
}

TEST_F(ClientIntegrationTest, AttnbenchRoundRobinReachesEveryServer) {
  auto second = StartServer("second");
  ASSERT_NE(second, nullptr);
  const double before[2] = {server_->RequestsTotal(), second->RequestsTotal()};
  ASSERT_GE(before[0], 0);
  ASSERT_GE(before[1], 0);
  ToolResult r = Attnbench({"--target", absl::StrCat("ipv4:127.0.0.1:", server_->grpc_port, ",127.0.0.1:",
                                                     second->grpc_port),
                            "--concurrency", "4", "--duration", "2", "--warmup", "0.2", "--seq", "8", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ExpectSaneSteps(ParseJson(r), 1);
  EXPECT_GT(server_->RequestsTotal(), before[0] + 10);
  EXPECT_GT(second->RequestsTotal(), before[1] + 10);
}

// The inodes of the sockets process `pid` holds open ("socket:[N]" links under /proc/<pid>/fd).
std::set<std::string> SocketInodes(pid_t pid) {
  std::set<std::string> inodes;
  std::error_code error;
  for (const auto& fd : std::filesystem::directory_iterator(absl::StrCat("/proc/", pid, "/fd"), error)) {
    const std::string link = std::filesystem::read_symlink(fd.path(), error).string();
    if (absl::StartsWith(link, "socket:[") && absl::EndsWith(link, "]")) {
      inodes.insert(link.substr(8, link.size() - 9));
    }
  }
  return inodes;
}

// Process `pid`'s established TCP connections to 127.0.0.1:`port`, by their client-side endpoints (address:port
// as /proc/net shows them): entries of /proc/net/tcp and tcp6 (gRPC's sockets are dual-stack, so IPv4 peers
// show as v4-mapped) in state 01 whose inode `pid` holds. Only that process's: the server's listener probe
// connects to its own port every 5 s, and counting its socket made attnbench's 3 connections 4 under ASan.
std::set<std::string> ConnectionsTo(int port, pid_t pid) {
  const std::set<std::string> inodes = SocketInodes(pid);
  std::set<std::string> endpoints;
  for (const auto& [file, address] : {std::pair{"/proc/net/tcp", "0100007F"},
                                      std::pair{"/proc/net/tcp6", "0000000000000000FFFF00000100007F"}}) {
    std::ifstream tcp(file);
    std::string line;
    std::getline(tcp, line);  // header
    const std::string remote = absl::StrFormat("%s:%04X", address, port);
    while (std::getline(tcp, line)) {
      const std::vector<std::string> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
      if (f.size() > 9 && f[2] == remote && f[3] == "01" && inodes.count(f[9]) > 0) endpoints.insert(f[1]);
    }
  }
  return endpoints;
}

// Connections of `pid` to `port` established now that were not in `before` (closed ones do not count).
int NewConnections(const std::set<std::string>& before, int port, pid_t pid) {
  int count = 0;
  for (const std::string& endpoint : ConnectionsTo(port, pid)) count += before.count(endpoint) == 0 ? 1 : 0;
  return count;
}

// own_connection gives each client a TCP connection of its own; without it, clients of one target share one.
TEST_F(ClientIntegrationTest, OwnConnectionOpensOneConnectionPerClient) {
  for (const bool own : {false, true}) {
    const std::set<std::string> before = ConnectionsTo(server_->grpc_port, getpid());
    std::vector<std::unique_ptr<Client>> clients;
    for (int i = 0; i < 3; ++i) {
      Client::Options o;
      o.target = server_->target();
      o.own_connection = own;
      auto c = Client::Create(o);
      ASSERT_TRUE(c.ok()) << c.status();
      ASSERT_TRUE((*c)->Health().ok());
      clients.push_back(std::move(*c));
    }
    const int opened = NewConnections(before, server_->grpc_port, getpid());
    if (own) {
      EXPECT_EQ(opened, 3);
    } else {
      EXPECT_LE(opened, 1);
    }
  }
}

// attnbench --connections 3: while it runs, exactly three new connections reach the server, and the report
// names them; the open loop (KServe) spreads over connections too.
TEST_F(ClientIntegrationTest, AttnbenchSpreadsWorkersOverConnections) {
  auto bench = at::Subprocess::Start({ATTNBENCH_BINARY, "--target", server_->target(), "--connections", "3",
                                      "--concurrency", "6", "--duration", "2", "--warmup", "0", "--seq", "8",
                                      "--json", "--quiet"},
                                     TempPath("spread.log"));
  ASSERT_TRUE(bench.ok()) << bench.status();
  int most = 0;
  for (int i = 0; i < 30; ++i) {  // 1.5 s of the 2 s run
    absl::SleepFor(absl::Milliseconds(50));
    most = std::max(most, static_cast<int>(ConnectionsTo(server_->grpc_port, (*bench)->pid()).size()));
  }
  auto code = (*bench)->WaitForExit(kToolTimeout);
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 0) << (*bench)->ReadLog();
  EXPECT_EQ(most, 3);
  EXPECT_THAT((*bench)->ReadLog(), HasSubstr("connections=3"));
  ToolResult r = Attnbench({"--target", server_->target(), "--connections", "2", "--kserve", "--rate", "50",
                            "--duration", "1", "--warmup", "0", "--seq", "8", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ExpectSaneSteps(ParseJson(r), 1);
}

// Sessions over a two-address target: every call of a session reaches the server that created it (the one
// its routing key hashes to), outputs equal the engine's causal attention, a "<parent>:<suffix>" fork lives
// with its parent.
TEST_F(ClientIntegrationTest, SessionClientKeepsEachSessionOnItsServer) {
  auto second = StartServer("second");
  ASSERT_NE(second, nullptr);
  auto both = NewClient(absl::StrCat("ipv4:127.0.0.1:", server_->grpc_port, ",127.0.0.1:", second->grpc_port));
  auto sessions = SessionClient::Create(both.get());
  ASSERT_TRUE(sessions.ok()) << sessions.status();
  ASSERT_EQ((*sessions)->addresses().size(), 2u);
  std::unique_ptr<Client> direct[2] = {NewClient(server_->target()), NewClient(second->target())};
  int held[2] = {0, 0};
  constexpr int64_t kTokens = 6, kE = 256;
  for (int i = 0; i < 20; ++i) {
    const std::string id = absl::StrCat("cpp-", i);
    ASSERT_TRUE((*sessions)->CreateSession({id, {"small"}}).ok());
    const std::vector<float> x = RandomValues(kTokens * kE, 100 + i);
    auto first = (*sessions)->Append(id, "small", absl::MakeConstSpan(x).subspan(0, 5 * kE), 5);
    auto last = (*sessions)->Append(id, "small", absl::MakeConstSpan(x).subspan(5 * kE), 1);
    ASSERT_TRUE(first.ok() && last.ok()) << first.status() << " " << last.status();
    EXPECT_EQ(last->position, kTokens);
    std::vector<float> got = first->output.values;
    got.insert(got.end(), last->output.values.begin(), last->output.values.end());
    AttentionInputs in;
    in.query = TensorView::F32(x.data(), {kTokens, kE});
    in.is_causal = true;
    auto expected = SmallEngine().Forward(in);
    ASSERT_TRUE(expected.ok());
    ExpectNear(got, expected->output.values, "session outputs");
    int holders = 0;
    for (int s = 0; s < 2; ++s) {
      auto one = SessionClient::Create(direct[s].get());
      if ((*one)->Get(id).ok()) {
        ++holders;
        ++held[s];
        EXPECT_EQ((*sessions)->AddressOf(id), static_cast<size_t>(s)) << id;
      }
    }
    EXPECT_EQ(holders, 1) << id << " must live on exactly one server";
  }
  EXPECT_GT(held[0], 0);
  EXPECT_GT(held[1], 0);
  auto fork = (*sessions)->Fork("cpp-3", "cpp-3:alt");
  ASSERT_TRUE(fork.ok()) << fork.status();
  const std::vector<float> next = RandomValues(kE, 7);
  EXPECT_TRUE((*sessions)->Append("cpp-3:alt", "small", next, 1).ok());
}

TEST_F(ClientIntegrationTest, AttnbenchErrorsBeforeTheRun) {
  ToolResult r = Attnbench({"--target", server_->target(), "--layer", "nope", "--duration", "1"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("NOT_FOUND"));
  r = Attnbench({"--target", absl::StrCat("127.0.0.1:", FreePort()), "--duration", "1"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("is the server running"));
  r = Attnbench({"--concurrency", "4", "--rate", "10"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("give one of them"));
}

TEST(EchoIntegrationTest, AttnbenchDrivesTheEchoServer) {
  auto echo = at::Subprocess::Start({ECHO_SERVER_BINARY, "--address", "127.0.0.1:0"}, TempPath("echo.log"));
  ASSERT_TRUE(echo.ok()) << echo.status();
  auto port = (*echo)->WaitForLogRegex(R"(ready: port=(\d+))", kStartTimeout);
  ASSERT_TRUE(port.ok()) << port.status();
  ToolResult r = Attnbench({"--echo", "--payload-bytes", "4096", "--target", absl::StrCat("127.0.0.1:", (*port)[1]),
                            "--concurrency", "1,4", "--duration", "1", "--warmup", "0.2", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json steps = ParseJson(r);
  ExpectSaneSteps(steps, 2);
  EXPECT_EQ(steps[0]["workload"], "echo payload=4096B unary");
  EXPECT_EQ(steps[0]["server"]["samples"], 0);  // the echo service reports no timing

  ASSERT_TRUE((*echo)->Signal(SIGTERM).ok());
  auto code = (*echo)->WaitForExit(absl::Seconds(10));
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 0);
}

}  // namespace
}  // namespace attnserve
