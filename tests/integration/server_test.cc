// End-to-end tests of the attnserve binary: every test starts its own server process on ephemeral loopback
// ports (tests/testing/subprocess.h), talks to it over gRPC with the generated stubs, reads its /metrics,
// and checks every numeric answer against the same layer built in-process (MultiheadAttention::Create
// with RandomMhaWeights(config, seed), which is what the server does for a layer without weights_path).
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <omp.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "core/attention_inputs.h"
#include "core/mha_weights.h"
#include "core/multihead_attention.h"
#include "gmock/gmock.h"
#include "google/protobuf/descriptor.pb.h"
#include "grpc_health_v1.grpc.pb.h"
#include "grpc_reflection_v1alpha.grpc.pb.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/http_get.h"
#include "tests/testing/naive_mha.h"
#include "tests/testing/subprocess.h"

#ifndef ATTNSERVE_BINARY
#error "ATTNSERVE_BINARY must name the attnserve executable (set by tests/CMakeLists.txt)"
#endif
#ifndef ATTNSERVE_PROMETHEUS
#define ATTNSERVE_PROMETHEUS ""
#endif

namespace attnserve {
namespace {

namespace at = attnserve::testing;
namespace v1 = attnserve::v1;
using ::testing::HasSubstr;

constexpr double kTolerance = 1e-5;
constexpr absl::Duration kStartTimeout = absl::Seconds(60);
constexpr int kMaxMessageBytes = 64 << 20;

// ---------------------------------------------------------------------------------------------------
// Files, processes, channels.

// Per process, so concurrent runs of this binary (other checkouts, other users) never share a file.
const std::string& TempDirOfRun() {
  static const std::string dir =
      (std::filesystem::path(::testing::TempDir()) / absl::StrCat("attnserve_integ_", getpid())).string();
  return dir;
}

std::string TempPath(const std::string& name) {
  std::filesystem::create_directories(TempDirOfRun());
  return (std::filesystem::path(TempDirOfRun()) / name).string();
}

// Removes the run's configs, logs and Prometheus data when every test passed; kept for a look otherwise.
class RemoveTempDirOnSuccess : public ::testing::Environment {
 public:
  void TearDown() override {
    if (::testing::UnitTest::GetInstance()->Passed()) {
      std::error_code ignored;
      std::filesystem::remove_all(TempDirOfRun(), ignored);
    } else {
      std::fprintf(stderr, "logs and configs kept in %s\n", TempDirOfRun().c_str());
    }
  }
};
[[maybe_unused]] ::testing::Environment* const kRemoveTempDir =
    ::testing::AddGlobalTestEnvironment(new RemoveTempDirOnSuccess);

void WriteFile(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
  out.close();
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

std::string Str(const grpc::Status& s) {
  return absl::StrCat("code ", static_cast<int>(s.error_code()), " '", s.error_message(), "'");
}

std::shared_ptr<grpc::Channel> MakeChannel(int port) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  return grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials(), args);
}

std::chrono::system_clock::time_point In(absl::Duration d) { return absl::ToChronoTime(absl::Now() + d); }

// A free loopback TCP port: bound to port 0, read back, closed.
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  sockaddr_in addr;
  std::memset(&addr, 0, sizeof(addr));
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

struct TestServer {
  std::unique_ptr<at::Subprocess> process;
  int grpc_port = 0;
  int metrics_port = 0;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::AttentionService::Stub> stub;

  absl::StatusOr<std::string> Metrics() const { return at::HttpGet("127.0.0.1", metrics_port, "/metrics"); }
};

// Starts attnserve on ephemeral loopback ports, with `config_pbtxt` written to a temp file (empty: the
// embedded default config), and waits for its "ready" line and a connected channel.
absl::StatusOr<std::unique_ptr<TestServer>> StartServer(const std::string& name, const std::string& config_pbtxt,
                                                        const std::vector<std::string>& extra_args = {}) {
  std::vector<std::string> args = {ATTNSERVE_BINARY, "--grpc-address", "127.0.0.1:0", "--metrics-address",
                                   "127.0.0.1:0"};
  if (!config_pbtxt.empty()) {
    const std::string path = TempPath(name + ".pbtxt");
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << config_pbtxt;
    out.close();
    if (!out.good()) return absl::InternalError(absl::StrCat("cannot write ", path));
    args.insert(args.end(), {"--config", path});
  }
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  auto server = std::make_unique<TestServer>();
  absl::StatusOr<std::unique_ptr<at::Subprocess>> process = at::Subprocess::Start(args, TempPath(name + ".log"));
  if (!process.ok()) return process.status();
  server->process = std::move(*process);
  absl::StatusOr<std::vector<std::string>> ready =
      server->process->WaitForLogRegex(R"(ready: grpc_port=(\d+) metrics_port=(\d+))", kStartTimeout);
  if (!ready.ok()) return ready.status();
  if (!absl::SimpleAtoi((*ready)[1], &server->grpc_port) || !absl::SimpleAtoi((*ready)[2], &server->metrics_port) ||
      server->grpc_port <= 0 || server->metrics_port <= 0) {
    return absl::InternalError(absl::StrCat("bad ready line: ", (*ready)[0]));
  }
  server->channel = MakeChannel(server->grpc_port);
  if (!server->channel->WaitForConnected(In(absl::Seconds(30)))) {
    return absl::UnavailableError(absl::StrCat("cannot connect to 127.0.0.1:", server->grpc_port));
  }
  server->stub = v1::AttentionService::NewStub(server->channel);
  return server;
}

// ---------------------------------------------------------------------------------------------------
// /metrics in Prometheus' text format.

struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

std::vector<Sample> ParseMetrics(const std::string& text) {
  std::vector<Sample> samples;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    Sample s;
    size_t pos = line.find_first_of("{ ");
    if (pos == std::string::npos) continue;
    s.name = line.substr(0, pos);
    if (line[pos] == '{') {
      const size_t end = line.find('}', pos);
      if (end == std::string::npos) continue;
      std::string body = line.substr(pos + 1, end - pos - 1);
      size_t i = 0;
      while (i < body.size()) {
        const size_t eq = body.find('=', i);
        if (eq == std::string::npos || eq + 1 >= body.size() || body[eq + 1] != '"') break;
        const size_t close = body.find('"', eq + 2);
        if (close == std::string::npos) break;
        s.labels[body.substr(i, eq - i)] = body.substr(eq + 2, close - eq - 2);
        i = close + 1;
        if (i < body.size() && body[i] == ',') ++i;
      }
      pos = end + 1;
    }
    const std::string value = line.substr(pos);
    s.value = std::strtod(value.c_str(), nullptr);
    samples.push_back(std::move(s));
  }
  return samples;
}

// The value of the first sample named `name` whose labels include `labels`.
std::optional<double> MetricValue(const std::string& text, const std::string& name,
                                  const std::map<std::string, std::string>& labels = {}) {
  for (const Sample& s : ParseMetrics(text)) {
    if (s.name != name) continue;
    bool match = true;
    for (const auto& [k, v] : labels) {
      auto it = s.labels.find(k);
      if (it == s.labels.end() || it->second != v) match = false;
    }
    if (match) return s.value;
  }
  return std::nullopt;
}

// The lines of `text` about `name`, for failure messages.
std::string MetricLines(const std::string& text, const std::string& name) {
  std::istringstream in(text);
  std::string line, out;
  while (std::getline(in, line)) {
    if (line.rfind(name, 0) == 0) absl::StrAppend(&out, line, "\n");
  }
  return out;
}

// Polls /metrics until pred holds; false on timeout. *last holds the last text read.
bool PollMetrics(const TestServer& server, const std::function<bool(const std::string&)>& pred,
                 absl::Duration timeout, std::string* last) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    absl::StatusOr<std::string> text = server.Metrics();
    if (text.ok()) {
      *last = *text;
      if (pred(*text)) return true;
    } else {
      *last = absl::StrCat("(scrape failed: ", text.status().ToString(), ")");
    }
    if (absl::Now() >= deadline) return false;
    absl::SleepFor(absl::Milliseconds(20));
  }
}

// ---------------------------------------------------------------------------------------------------
// Requests built on the host side, their protobuf form and their in-process answer.

struct HostTensor {
  Shape shape;
  std::vector<float> f;    // FLOAT32 values
  std::vector<uint8_t> b;  // BOOL values, when is_bool
  bool is_bool = false;

  bool present() const { return !shape.empty(); }
  TensorView view() const {
    if (!present()) return TensorView{};
    return is_bool ? TensorView::Bool(b.data(), shape) : TensorView::F32(f.data(), shape);
  }
};

enum class Encoding { kRaw, kRepeated };  // raw_data, or float_data / bool_data

HostTensor RandomF32(std::mt19937_64& rng, Shape shape) {
  HostTensor t;
  t.shape = std::move(shape);
  t.f = at::RandomValues(rng, NumElements(t.shape));
  return t;
}

// Random BOOL values, the first of each row false so that no row is masked out entirely.
HostTensor RandomBoolMask(std::mt19937_64& rng, Shape shape) {
  HostTensor t;
  t.shape = std::move(shape);
  t.is_bool = true;
  t.b.resize(static_cast<size_t>(NumElements(t.shape)));
  std::bernoulli_distribution coin(0.3);
  const int64_t row = t.shape.back();
  for (size_t i = 0; i < t.b.size(); ++i) t.b[i] = (i % row != 0 && coin(rng)) ? 1 : 0;
  return t;
}

void ToProto(const HostTensor& t, Encoding enc, v1::Tensor* out) {
  if (!t.present()) return;
  for (int64_t d : t.shape) out->add_shape(d);
  if (t.is_bool) {
    out->set_dtype(v1::BOOL);
    if (enc == Encoding::kRaw) {
      out->set_raw_data(std::string(reinterpret_cast<const char*>(t.b.data()), t.b.size()));
    } else {
      for (uint8_t v : t.b) out->add_bool_data(v != 0);
    }
  } else if (enc == Encoding::kRaw) {
    out->set_dtype(v1::FLOAT32);
    out->set_raw_data(std::string(reinterpret_cast<const char*>(t.f.data()), t.f.size() * sizeof(float)));
  } else {
    // dtype left unspecified: float_data implies FLOAT32.
    for (float v : t.f) out->add_float_data(v);
  }
}

struct HostRequest {
  std::string layer;
  std::string id;
  HostTensor query, key, value, key_padding_mask, attn_mask;
  bool is_causal = false;
  bool need_weights = false;
  std::optional<bool> average_attn_weights;

  v1::InferRequest ToProto(Encoding enc = Encoding::kRaw) const {
    v1::InferRequest r;
    r.set_layer(layer);
    r.set_id(id);
    ::attnserve::ToProto(query, enc, r.mutable_query());
    if (key.present()) ::attnserve::ToProto(key, enc, r.mutable_key());
    if (value.present()) ::attnserve::ToProto(value, enc, r.mutable_value());
    if (key_padding_mask.present()) ::attnserve::ToProto(key_padding_mask, enc, r.mutable_key_padding_mask());
    if (attn_mask.present()) ::attnserve::ToProto(attn_mask, enc, r.mutable_attn_mask());
    r.set_is_causal(is_causal);
    r.set_need_weights(need_weights);
    if (average_attn_weights.has_value()) r.set_average_attn_weights(*average_attn_weights);
    return r;
  }

  AttentionInputs Inputs() const {
    AttentionInputs in;
    in.query = query.view();
    in.key = key.view();
    in.value = value.view();
    in.key_padding_mask = key_padding_mask.view();
    in.attn_mask = attn_mask.view();
    in.is_causal = is_causal;
    in.need_weights = need_weights;
    in.average_attn_weights = average_attn_weights.value_or(true);
    return in;
  }
};

// The in-process twin of a served seeded layer, built once per (E, H, seed).
const MultiheadAttention& Engine(int64_t embed_dim, int64_t num_heads, uint64_t seed) {
  static absl::Mutex mu;
  static auto* engines = new std::map<std::tuple<int64_t, int64_t, uint64_t>, std::unique_ptr<MultiheadAttention>>;
  absl::MutexLock lock(&mu);
  auto& slot = (*engines)[{embed_dim, num_heads, seed}];
  if (slot == nullptr) {
    // oneDNN fixes a primitive's thread count when it is created: one, like every reference (see Expected).
    omp_set_num_threads(1);
    MultiheadAttention::Options options;
    options.config.embed_dim = embed_dim;
    options.config.num_heads = num_heads;
    auto engine = MultiheadAttention::Create(options, RandomMhaWeights(options.config, seed));
    if (!engine.ok()) {
      std::fprintf(stderr, "cannot build the reference layer: %s\n", engine.status().ToString().c_str());
      std::abort();
    }
    slot = std::move(*engine);
  }
  return *slot;
}

// The layers of the embedded default config.
const MultiheadAttention& Small() { return Engine(256, 4, 1); }
const MultiheadAttention& Base() { return Engine(768, 12, 2); }

AttentionOutputs Expected(const MultiheadAttention& engine, const HostRequest& request) {
  // One OpenMP thread for the references (all computed on the main thread): on a shared, loaded machine a
  // 2-thread team turns each tiny Forward into ~15 ms of spinning at barriers, and the answers do not
  // depend on the thread count.
  omp_set_num_threads(1);
  absl::StatusOr<AttentionOutputs> out = engine.Forward(request.Inputs());
  if (!out.ok()) {
    ADD_FAILURE() << "reference Forward failed: " << out.status();
    return {};
  }
  return std::move(*out);
}

// A self-attention request [B, L, E] (or [L, E] when batch == 0) with random values.
HostRequest SelfAttention(std::mt19937_64& rng, const std::string& layer, int64_t embed_dim, int64_t batch,
                          int64_t len) {
  HostRequest r;
  r.layer = layer;
  r.query = RandomF32(rng, batch == 0 ? Shape{len, embed_dim} : Shape{batch, len, embed_dim});
  return r;
}

// "" when `t` is a FLOAT32 tensor in raw_data of `shape`; fills `values`.
std::string DecodeF32(const v1::Tensor& t, const Shape& shape, std::vector<float>* values) {
  const Shape got(t.shape().begin(), t.shape().end());
  if (got != shape) return absl::StrCat("shape ", ShapeToString(got), ", expected ", ShapeToString(shape));
  if (t.dtype() != v1::FLOAT32) return absl::StrCat("dtype ", v1::DataType_Name(t.dtype()), ", expected FLOAT32");
  const size_t n = static_cast<size_t>(NumElements(shape));
  if (t.raw_data().size() != n * sizeof(float)) {
    return absl::StrCat("raw_data holds ", t.raw_data().size(), " bytes, expected ", n * sizeof(float));
  }
  values->resize(n);
  std::memcpy(values->data(), t.raw_data().data(), n * sizeof(float));
  return "";
}

// Compares an answer with the in-process result: output (and attn_weights when asked for) within kTolerance.
::testing::AssertionResult Matches(const v1::InferResponse& response, const AttentionOutputs& want,
                                   bool need_weights) {
  if (response.has_error()) {
    return ::testing::AssertionFailure() << "response carries error " << response.error().code() << " '"
                                         << response.error().message() << "'";
  }
  std::vector<float> got;
  if (std::string e = DecodeF32(response.output(), want.output.shape, &got); !e.empty()) {
    return ::testing::AssertionFailure() << "output: " << e;
  }
  const double out_diff = at::MaxAbsDiff(got, want.output.values);
  if (!(out_diff <= kTolerance)) return ::testing::AssertionFailure() << "output: max abs diff " << out_diff;
  if (need_weights) {
    if (std::string e = DecodeF32(response.attn_weights(), want.attn_weights.shape, &got); !e.empty()) {
      return ::testing::AssertionFailure() << "attn_weights: " << e;
    }
    const double w_diff = at::MaxAbsDiff(got, want.attn_weights.values);
    if (!(w_diff <= kTolerance)) return ::testing::AssertionFailure() << "attn_weights: max abs diff " << w_diff;
  } else if (response.attn_weights().shape_size() != 0 || !response.attn_weights().raw_data().empty()) {
    return ::testing::AssertionFailure() << "attn_weights present although need_weights was false";
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------------
// Malformed requests on "small" (E = 256), each with the code and message fragments it must get.

enum class Bad { kWrongLastDim, kRawBytes, kRawAndFloat, kMaskShape, kBoolQuery, kUnknownLayer };
constexpr Bad kAllBad[] = {Bad::kWrongLastDim, Bad::kRawBytes, Bad::kRawAndFloat,
                           Bad::kMaskShape,    Bad::kBoolQuery, Bad::kUnknownLayer};

struct BadRequest {
  v1::InferRequest request;
  grpc::StatusCode code;
  std::vector<std::string> fragments;  // each must appear in the error message
};

BadRequest MakeBad(Bad kind, std::mt19937_64& rng, const std::string& id) {
  BadRequest bad;
  bad.code = grpc::StatusCode::INVALID_ARGUMENT;
  HostRequest r = SelfAttention(rng, "small", 256, 1, 8);
  r.id = id;
  switch (kind) {
    case Bad::kWrongLastDim:
      r.query = RandomF32(rng, {1, 8, 255});
      bad.request = r.ToProto();
      bad.fragments = {"query"};
      break;
    case Bad::kRawBytes:
      bad.request = r.ToProto();
      bad.request.mutable_query()->mutable_raw_data()->resize(8 * 256 * 4 - 4);
      bad.fragments = {"query", "raw_data"};
      break;
    case Bad::kRawAndFloat:
      bad.request = r.ToProto();
      bad.request.mutable_query()->add_float_data(1.0f);
      bad.fragments = {"query", "raw_data", "float_data"};
      break;
    case Bad::kMaskShape:
      r.key_padding_mask = RandomBoolMask(rng, {1, 7});
      bad.request = r.ToProto();
      bad.fragments = {"key_padding_mask"};
      break;
    case Bad::kBoolQuery: {
      HostTensor q;
      q.shape = {1, 8, 256};
      q.is_bool = true;
      q.b.assign(8 * 256, 1);
      r.query = q;
      bad.request = r.ToProto();
      bad.fragments = {"query", "BOOL"};
      break;
    }
    case Bad::kUnknownLayer:
      r.layer = "no_such_layer";
      bad.request = r.ToProto();
      bad.code = grpc::StatusCode::NOT_FOUND;
      bad.fragments = {"layer", "no_such_layer"};
      break;
  }
  return bad;
}

std::string CheckBadStatus(const BadRequest& bad, grpc::StatusCode code, const std::string& message) {
  if (code != bad.code) {
    return absl::StrCat("id ", bad.request.id(), ": code ", static_cast<int>(code), " '", message, "', expected ",
                        static_cast<int>(bad.code));
  }
  for (const std::string& f : bad.fragments) {
    if (message.find(f) == std::string::npos) {
      return absl::StrCat("id ", bad.request.id(), ": message '", message, "' does not mention '", f, "'");
    }
  }
  return "";
}

// Collects the first few failures of many threads.
class Failures {
 public:
  void Add(std::string what) {
    absl::MutexLock lock(&mu_);
    ++count_;
    if (first_.size() < 10) first_.push_back(std::move(what));
  }
  int count() const {
    absl::MutexLock lock(&mu_);
    return count_;
  }
  std::string Summary() const {
    absl::MutexLock lock(&mu_);
    return absl::StrCat(count_, " failure(s), first: \n  ", absl::StrJoin(first_, "\n  "));
  }

 private:
  mutable absl::Mutex mu_;
  int count_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::string> first_ ABSL_GUARDED_BY(mu_);
};

// ---------------------------------------------------------------------------------------------------
// Fixture: prints the logs of the processes a failed test started.

class ServerTest : public ::testing::Test {
 protected:
  // Starts a server (see StartServer) owned by the fixture; fails the test on error.
  TestServer* Start(const std::string& name, const std::string& config_pbtxt = "",
                    const std::vector<std::string>& extra_args = {}) {
    const std::string unique = absl::StrCat(name, "_", ++started_);
    absl::StatusOr<std::unique_ptr<TestServer>> server = StartServer(unique, config_pbtxt, extra_args);
    if (!server.ok()) {
      ADD_FAILURE() << "cannot start attnserve: " << server.status();
      return nullptr;
    }
    logs_.push_back((*server)->process.get());
    servers_.push_back(std::move(*server));
    return servers_.back().get();
  }
  // Takes another process (e.g. Prometheus) into the fixture: its log is printed on failure, and it is
  // killed at the end of the test at the latest.
  at::Subprocess* Own(std::unique_ptr<at::Subprocess> process) {
    logs_.push_back(process.get());
    others_.push_back(std::move(process));
    return others_.back().get();
  }

  void TearDown() override {
    if (HasFailure()) {
      for (const at::Subprocess* p : logs_) {
        std::fprintf(stderr, "---- log of pid %d (%s) ----\n%s\n", p->pid(), p->log_path().c_str(),
                     p->LogTail(6000).c_str());
      }
    }
    others_.clear();   // SIGKILLs whatever still runs
    servers_.clear();
    logs_.clear();
  }

  std::vector<std::unique_ptr<TestServer>> servers_;
  std::vector<std::unique_ptr<at::Subprocess>> others_;
  std::vector<const at::Subprocess*> logs_;
  int started_ = 0;
};

#define START_OR_RETURN(var, ...)  \
  TestServer* var = Start(__VA_ARGS__); \
  ASSERT_NE(var, nullptr)

// ---------------------------------------------------------------------------------------------------
// a. Infer's answers equal the engine's.

TEST_F(ServerTest, InferEqualsEngine) {
  START_OR_RETURN(server, "infer");
  std::mt19937_64 rng(11);

  struct Case {
    std::string what;
    HostRequest request;
    Encoding encoding;
  };
  std::vector<Case> cases;
  {
    HostRequest r = SelfAttention(rng, "small", 256, 2, 5);
    r.key_padding_mask = RandomBoolMask(rng, {2, 5});
    r.need_weights = true;
    r.id = "batched-raw";
    cases.push_back({"[2,5,256] raw_data + bool key_padding_mask + need_weights", r, Encoding::kRaw});
    r.id = "batched-float";
    cases.push_back({"the same in float_data / bool_data", r, Encoding::kRepeated});
  }
  {
    HostRequest r = SelfAttention(rng, "small", 256, 0, 7);
    r.need_weights = true;
    r.id = "unbatched";
    cases.push_back({"unbatched [7,256] + need_weights", r, Encoding::kRaw});
  }
  {
    HostRequest r = SelfAttention(rng, "small", 256, 2, 5);
    r.key = RandomF32(rng, {2, 9, 256});
    r.value = RandomF32(rng, {2, 9, 256});
    r.key_padding_mask = RandomBoolMask(rng, {2, 9});
    r.need_weights = true;
    r.average_attn_weights = false;
    r.id = "cross";
    cases.push_back({"cross-attention key/value [2,9,256], per-head weights", r, Encoding::kRaw});
  }

  for (const Case& c : cases) {
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
// b. Many concurrent clients: every answer right, batching visible in the metrics.

TEST_F(ServerTest, ConcurrentClientsAreBatchedAndCorrect) {
  START_OR_RETURN(server, "concurrent");
  constexpr int kClients = 64;
  constexpr int kPerClient = 20;

  struct Item {
    v1::InferRequest proto;
    AttentionOutputs want;
    bool need_weights;
  };
  std::vector<std::vector<Item>> work(kClients);
  int64_t total_tokens = 0;
  double total_flops = 0;
  const MhaConfig small_config = Small().config();
  const absl::Time reference_start = absl::Now();
  for (int c = 0; c < kClients; ++c) {
    std::mt19937_64 rng(1000 + c);
    std::uniform_int_distribution<int64_t> len(4, 32);
    for (int i = 0; i < kPerClient; ++i) {
      const int64_t batch = (i % 3 == 0) ? 2 : 1;
      const int64_t l = len(rng);
      HostRequest r = SelfAttention(rng, "small", 256, batch, l);
      r.id = absl::StrCat(c, "/", i);
      r.need_weights = i % 2 == 0;
      work[c].push_back(Item{r.ToProto(), Expected(Small(), r), r.need_weights});
      total_tokens += batch * l;
      total_flops += static_cast<double>(AttentionFlops(small_config, batch, l, l));
    }
  }

  std::printf("in-process references of %d requests: %s\n", kClients * kPerClient,
              absl::FormatDuration(absl::Now() - reference_start).c_str());

  Failures failures;
  std::vector<std::thread> clients;
  const absl::Time start = absl::Now();
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&, c] {
      for (const Item& item : work[c]) {
        grpc::ClientContext ctx;
        ctx.set_deadline(In(absl::Seconds(60)));
        v1::InferResponse response;
        const grpc::Status status = server->stub->Infer(&ctx, item.proto, &response);
        if (!status.ok()) {
          failures.Add(absl::StrCat(item.proto.id(), ": ", Str(status)));
          continue;
        }
        if (auto m = Matches(response, item.want, item.need_weights); !m) {
          failures.Add(absl::StrCat(item.proto.id(), ": ", m.message()));
        }
      }
    });
  }
  for (std::thread& t : clients) t.join();
  std::printf("%d requests from %d clients answered in %s\n", kClients * kPerClient, kClients,
              absl::FormatDuration(absl::Now() - start).c_str());
  EXPECT_EQ(failures.count(), 0) << failures.Summary();

  // Every answer is counted before it is sent, so the metrics are final now.
  absl::StatusOr<std::string> text = server->Metrics();
  ASSERT_TRUE(text.ok()) << text.status();
  const std::map<std::string, std::string> small = {{"layer", "small"}};
  EXPECT_EQ(MetricValue(*text, "attnserve_requests_total", {{"layer", "small"}, {"code", "OK"}}),
            std::optional<double>(kClients * kPerClient))
      << MetricLines(*text, "attnserve_requests_total");
  const std::optional<double> batch_sum = MetricValue(*text, "attnserve_batch_size_sum", small);
  const std::optional<double> batch_count = MetricValue(*text, "attnserve_batch_size_count", small);
  ASSERT_TRUE(batch_sum.has_value() && batch_count.has_value()) << MetricLines(*text, "attnserve_batch_size");
  EXPECT_EQ(*batch_sum, kClients * kPerClient) << "every request ran in exactly one batch";
  EXPECT_GT(*batch_sum, *batch_count) << "no batch held more than one request:\n"
                                      << MetricLines(*text, "attnserve_batch_size");
  std::printf("batches: %.0f for %.0f requests (mean %.2f per batch)\n", *batch_count, *batch_sum,
              *batch_sum / *batch_count);
  EXPECT_EQ(MetricValue(*text, "attnserve_batch_tokens_sum", small), std::optional<double>(total_tokens));
  const std::optional<double> flops = MetricValue(*text, "attnserve_flops_total", small);
  ASSERT_TRUE(flops.has_value());
  EXPECT_NEAR(*flops, total_flops, total_flops * 1e-9);
  EXPECT_EQ(MetricValue(*text, "attnserve_queue_duration_seconds_count", small),
            std::optional<double>(kClients * kPerClient));
  EXPECT_EQ(MetricValue(*text, "attnserve_request_duration_seconds_count", small),
            std::optional<double>(kClients * kPerClient));
  EXPECT_EQ(MetricValue(*text, "attnserve_compute_duration_seconds_count", small), batch_count);
  EXPECT_EQ(MetricValue(*text, "attnserve_inflight_requests"), std::optional<double>(0));
  for (const char* family :
       {"attnserve_flops_total", "attnserve_queue_duration_seconds", "attnserve_compute_duration_seconds",
        "attnserve_batch_tokens", "attnserve_queue_depth", "attnserve_inflight_requests",
        "attnserve_request_duration_seconds", "attnserve_batch_size", "attnserve_requests_total"}) {
    EXPECT_THAT(*text, HasSubstr(absl::StrCat("# TYPE ", family, " "))) << family;
  }
  EXPECT_TRUE(MetricValue(*text, "attnserve_queue_depth", small).has_value());
}

// ---------------------------------------------------------------------------------------------------
// c. Overload: a tiny queue turns the excess away with RESOURCE_EXHAUSTED; what runs is right.

TEST_F(ServerTest, OverloadGetsResourceExhausted) {
  START_OR_RETURN(server, "overload", R"pb(
    worker_threads: 1
    layers {
      name: "wide"
      embed_dim: 512
      num_heads: 8
      seed: 3
      batching { max_batch_size: 2 max_queue_size: 4 }
    }
  )pb");
  constexpr int kRequests = 100;
  constexpr int kDistinct = 4;
  const MultiheadAttention& engine = Engine(512, 8, 3);
  std::mt19937_64 rng(21);
  std::vector<v1::InferRequest> protos;
  std::vector<AttentionOutputs> wants;
  for (int i = 0; i < kDistinct; ++i) {
    HostRequest r = SelfAttention(rng, "wide", 512, 1, 256);
    protos.push_back(r.ToProto());
    wants.push_back(Expected(engine, r));
  }

  struct Call {
    grpc::ClientContext ctx;
    v1::InferRequest request;
    v1::InferResponse response;
    grpc::Status status;
  };
  std::vector<std::unique_ptr<Call>> calls;
  for (int i = 0; i < kRequests; ++i) {
    auto call = std::make_unique<Call>();
    call->request = protos[i % kDistinct];
    call->request.set_id(absl::StrCat(i));
    call->ctx.set_deadline(In(absl::Seconds(60)));
    calls.push_back(std::move(call));
  }
  absl::Mutex mu;
  int done = 0;
  for (auto& call : calls) {
    Call* c = call.get();
    server->stub->async()->Infer(&c->ctx, &c->request, &c->response, [&mu, &done, c](grpc::Status s) {
      absl::MutexLock lock(&mu);
      c->status = std::move(s);
      ++done;
    });
  }
  {
    absl::MutexLock lock(&mu);
    const absl::Condition all_done(+[](int* d) { return *d == kRequests; }, &done);
    if (!mu.AwaitWithTimeout(all_done, absl::Seconds(90))) {
      ADD_FAILURE() << "only " << done << " of " << kRequests << " calls returned within 90 s";
      mu.Unlock();
      for (auto& call : calls) call->ctx.TryCancel();  // every callback still runs, promptly
      mu.Lock();
      mu.Await(all_done);
      return;
    }
  }

  int ok = 0, exhausted = 0;
  for (int i = 0; i < kRequests; ++i) {
    const Call& c = *calls[i];
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
// d. A request whose deadline passes, or that is cancelled, while it waits in the queue.

TEST_F(ServerTest, DeadlineAndCancellationWhileQueued) {
  START_OR_RETURN(server, "deadline", R"pb(
    layers {
      name: "slow"
      embed_dim: 64
      num_heads: 2
      seed: 4
      batching { max_batch_size: 64 max_queue_delay_us: 2000000 }
    }
  )pb");
  std::mt19937_64 rng(31);
  const v1::InferRequest request = SelfAttention(rng, "slow", 64, 1, 8).ToProto();
  const std::map<std::string, std::string> slow = {{"layer", "slow"}};
  auto code_count = [](const std::string& text, const char* code) {
    return MetricValue(text, "attnserve_requests_total", {{"layer", "slow"}, {"code", code}}).value_or(0);
  };
  std::string text;

  // Deadline: the client gives up at 200 ms; the server answers when the 2 s batch closes, without compute.
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(absl::Milliseconds(200)));
    v1::InferResponse response;
    const absl::Time sent = absl::Now();
    const grpc::Status status = server->stub->Infer(&ctx, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << Str(status);
    EXPECT_LT(absl::Now() - sent, absl::Seconds(1.5)) << "the client's deadline did not end the call";
    const bool seen = PollMetrics(
        *server, [&](const std::string& t) { return code_count(t, "DEADLINE_EXCEEDED") == 1; }, absl::Seconds(10),
        &text);
    EXPECT_TRUE(seen) << "server never counted the request as DEADLINE_EXCEEDED:\n"
                      << MetricLines(text, "attnserve_requests_total");
    std::printf("deadline: server answered after %s\n", absl::FormatDuration(absl::Now() - sent).c_str());
  }

  // Cancellation: TryCancel once the request is queued (queue depth 1).
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(absl::Seconds(30)));
    v1::InferResponse response;
    absl::Notification finished;
    grpc::Status status;
    server->stub->async()->Infer(&ctx, &request, &response, [&](grpc::Status s) {
      status = std::move(s);
      finished.Notify();
    });
    const bool queued = PollMetrics(
        *server, [&](const std::string& t) { return MetricValue(t, "attnserve_queue_depth", slow) == 1.0; },
        absl::Seconds(10), &text);
    EXPECT_TRUE(queued) << MetricLines(text, "attnserve_queue_depth");
    absl::SleepFor(absl::Milliseconds(100));  // "after ~100 ms"; not needed for correctness
    ctx.TryCancel();
    if (!finished.WaitForNotificationWithTimeout(absl::Seconds(10))) {
      ADD_FAILURE() << "the cancelled call did not return within 10 s";
      finished.WaitForNotification();
    }
    EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED) << Str(status);
    const bool seen = PollMetrics(
        *server, [&](const std::string& t) { return code_count(t, "CANCELLED") == 1; }, absl::Seconds(10), &text);
    EXPECT_TRUE(seen) << "server never counted the request as CANCELLED:\n"
                      << MetricLines(text, "attnserve_requests_total");
  }
  EXPECT_EQ(code_count(text, "DEADLINE_EXCEEDED"), 1) << MetricLines(text, "attnserve_requests_total");
  EXPECT_EQ(code_count(text, "OK"), 0) << MetricLines(text, "attnserve_requests_total");
  EXPECT_EQ(MetricValue(text, "attnserve_compute_duration_seconds_count", slow), std::optional<double>(0))
      << "a request nobody waits for any more was computed";
  EXPECT_EQ(MetricValue(text, "attnserve_inflight_requests"), std::optional<double>(0));
}

// ---------------------------------------------------------------------------------------------------
// e. Malformed requests mixed into a busy stream of good ones.

TEST_F(ServerTest, MalformedRequestsAmongGoodOnes) {
  START_OR_RETURN(server, "malformed");
  constexpr int kClients = 16;
  constexpr int kPerClient = 24;  // every third malformed

  struct Item {
    bool good;
    v1::InferRequest proto;
    AttentionOutputs want;  // good
    BadRequest bad;         // !good
  };
  std::vector<std::vector<Item>> work(kClients);
  for (int c = 0; c < kClients; ++c) {
    std::mt19937_64 rng(2000 + c);
    std::uniform_int_distribution<int64_t> len(4, 32);
    for (int i = 0; i < kPerClient; ++i) {
      Item item;
      const std::string id = absl::StrCat(c, "/", i);
      item.good = i % 3 != 1;
      if (item.good) {
        HostRequest r = SelfAttention(rng, "small", 256, 1, len(rng));
        r.id = id;
        if (i % 2 == 0) r.key_padding_mask = RandomBoolMask(rng, {1, r.query.shape[1]});
        item.proto = r.ToProto();
        item.want = Expected(Small(), r);
      } else {
        item.bad = MakeBad(kAllBad[(c + i) % std::size(kAllBad)], rng, id);
      }
      work[c].push_back(std::move(item));
    }
  }

  Failures failures;
  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&, c] {
      for (const Item& item : work[c]) {
        grpc::ClientContext ctx;
        ctx.set_deadline(In(absl::Seconds(60)));
        v1::InferResponse response;
        const grpc::Status status = server->stub->Infer(&ctx, item.good ? item.proto : item.bad.request, &response);
        if (item.good) {
          if (!status.ok()) {
            failures.Add(absl::StrCat(item.proto.id(), ": ", Str(status)));
          } else if (auto m = Matches(response, item.want, false); !m) {
            failures.Add(absl::StrCat(item.proto.id(), ": ", m.message()));
          }
        } else if (std::string e = CheckBadStatus(item.bad, status.error_code(), status.error_message());
                   !e.empty()) {
          failures.Add(e);
        }
      }
    });
  }
  for (std::thread& t : clients) t.join();
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

TEST_F(ServerTest, InferStreamMatchesById) {
  START_OR_RETURN(server, "stream");
  constexpr int kRequests = 50;
  std::mt19937_64 rng(41);
  std::uniform_int_distribution<int64_t> len(4, 32);
  std::vector<v1::InferRequest> requests;
  std::map<std::string, AttentionOutputs> wants;
  std::map<std::string, BadRequest> bads;
  for (int i = 0; i < kRequests; ++i) {
    const std::string id = absl::StrCat("s", i);
    if (i % 4 == 3) {
      BadRequest bad = MakeBad(kAllBad[(i / 4) % std::size(kAllBad)], rng, id);
      requests.push_back(bad.request);
      bads[id] = std::move(bad);
    } else {
      HostRequest r = SelfAttention(rng, "small", 256, 1 + i % 2, len(rng));
      r.id = id;
      requests.push_back(r.ToProto());
      wants[id] = Expected(Small(), r);
    }
  }

  grpc::ClientContext ctx;
  ctx.set_deadline(In(absl::Seconds(60)));
  auto stream = server->stub->InferStream(&ctx);
  std::vector<v1::InferResponse> responses;
  std::thread reader([&] {
    v1::InferResponse response;
    while (stream->Read(&response)) responses.push_back(response);
  });
  for (const v1::InferRequest& r : requests) {
    if (!stream->Write(r)) {
      ADD_FAILURE() << "Write failed at id " << r.id();
      break;
    }
  }
  stream->WritesDone();
  reader.join();
  const grpc::Status status = stream->Finish();
  EXPECT_TRUE(status.ok()) << Str(status);

  std::map<std::string, int> seen;
  for (const v1::InferResponse& response : responses) {
    const std::string& id = response.id();
    ++seen[id];
    if (auto it = wants.find(id); it != wants.end()) {
      EXPECT_TRUE(Matches(response, it->second, false)) << "id " << id;
    } else if (auto bad = bads.find(id); bad != bads.end()) {
      ASSERT_TRUE(response.has_error()) << "id " << id << " was malformed but got an answer";
      EXPECT_EQ(CheckBadStatus(bad->second, static_cast<grpc::StatusCode>(response.error().code()),
                               response.error().message()),
                "");
      EXPECT_FALSE(response.has_output()) << "id " << id;
    } else {
      ADD_FAILURE() << "response with unknown id '" << id << "'";
    }
  }
  EXPECT_EQ(responses.size(), static_cast<size_t>(kRequests));
  for (const v1::InferRequest& r : requests) EXPECT_EQ(seen[r.id()], 1) << "id " << r.id();
}

// ---------------------------------------------------------------------------------------------------
// g. SIGTERM under load: every call answered OK (and right) or UNAVAILABLE, health goes NOT_SERVING,
// exit code 0.

TEST_F(ServerTest, SigtermUnderLoadDrains) {
  const absl::Duration grace = absl::Seconds(30);
  START_OR_RETURN(server, "sigterm", "", {"--shutdown-grace", absl::FormatDuration(grace)});
  constexpr int kClients = 16;
  constexpr int kDistinct = 4;
  std::mt19937_64 rng(51);
  std::vector<v1::InferRequest> protos;
  std::vector<AttentionOutputs> wants;
  for (int i = 0; i < kDistinct; ++i) {
    HostRequest r = SelfAttention(rng, "base", 768, 1, 64);
    protos.push_back(r.ToProto());
    wants.push_back(Expected(Base(), r));
  }

  std::atomic<int> ok{0}, ok_after_signal{0}, unavailable{0};
  std::atomic<bool> signalled{false}, stop{false};
  Failures failures;
  std::vector<std::thread> clients;
  // Joins the clients however the test ends (they finish their call in flight and stop).
  struct JoinOnExit {
    std::atomic<bool>* stop;
    std::vector<std::thread>* threads;
    ~JoinOnExit() {
      stop->store(true);
      for (std::thread& t : *threads) t.join();
    }
  } joiner{&stop, &clients};
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&, c] {
      for (int i = 0; !stop.load(); ++i) {
        const int which = (c + i) % kDistinct;
        grpc::ClientContext ctx;
        ctx.set_deadline(In(absl::Seconds(40)));
        v1::InferResponse response;
        const bool after = signalled.load();
        const grpc::Status status = server->stub->Infer(&ctx, protos[which], &response);
        if (status.ok()) {
          ++ok;
          if (after) ++ok_after_signal;
          if (auto m = Matches(response, wants[which], false); !m) failures.Add(m.message());
        } else if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
          ++unavailable;
          return;
        } else {
          failures.Add(absl::StrCat("client ", c, ": ", Str(status)));
          return;
        }
      }
    });
  }
  // Some answers first.
  const absl::Time load_deadline = absl::Now() + absl::Seconds(30);
  while (ok.load() < 32 && failures.count() == 0 && absl::Now() < load_deadline) absl::SleepFor(absl::Milliseconds(5));
  if (ok.load() < 32) {
    FAIL() << "only " << ok.load() << " answers before the signal; " << failures.Summary();
  }

  auto health = grpc::health::v1::Health::NewStub(MakeChannel(server->grpc_port));
  const absl::Time signal_time = absl::Now();
  signalled.store(true);
  ASSERT_TRUE(server->process->Signal(SIGTERM).ok());

  // Tight health poll: SERVING is fine until the server logged the signal, not after.
  int checks = 0;
  std::string health_outcome;
  while (health_outcome.empty()) {
    if (absl::Now() - signal_time > absl::Seconds(15)) {
      health_outcome = "timeout";
      break;
    }
    const bool logged = server->process->ReadLog().find("received SIGTERM") != std::string::npos;
    grpc::ClientContext ctx;
    ctx.set_deadline(In(absl::Seconds(2)));
    grpc::health::v1::HealthCheckRequest request;
    grpc::health::v1::HealthCheckResponse response;
    const grpc::Status status = health->Check(&ctx, request, &response);
    ++checks;
    if (status.ok()) {
      if (response.status() == grpc::health::v1::HealthCheckResponse::NOT_SERVING) {
        health_outcome = "NOT_SERVING";
      } else if (response.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
        health_outcome = absl::StrCat("unexpected status ", response.status());
      } else if (logged) {
        health_outcome = "SERVING after 'received SIGTERM' was logged";
      }
    } else if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
      health_outcome = "UNAVAILABLE";
    } else {
      health_outcome = absl::StrCat("unexpected ", Str(status));
    }
  }
  std::printf("health after SIGTERM: %s (after %d checks, %s)\n", health_outcome.c_str(), checks,
              absl::FormatDuration(absl::Now() - signal_time).c_str());
  EXPECT_TRUE(health_outcome == "NOT_SERVING" || health_outcome == "UNAVAILABLE") << health_outcome;

  absl::StatusOr<int> exit_code = server->process->WaitForExit(grace + absl::Seconds(10));
  const absl::Duration stop_time = absl::Now() - signal_time;
  // The clients stop by themselves on their first UNAVAILABLE (at the latest once the server is gone).
  for (std::thread& t : clients) t.join();
  clients.clear();
  ASSERT_TRUE(exit_code.ok()) << exit_code.status();
  EXPECT_EQ(*exit_code, 0);
  EXPECT_LT(stop_time, grace) << "took longer than the grace";
  EXPECT_EQ(failures.count(), 0) << failures.Summary();
  EXPECT_EQ(unavailable.load(), kClients) << "every client ends on UNAVAILABLE";
  EXPECT_THAT(server->process->ReadLog(), HasSubstr("stopped after"));
  std::printf("SIGTERM: %d OK (%d sent after the signal), %d UNAVAILABLE; exit %d after %s\n", ok.load(),
              ok_after_signal.load(), unavailable.load(), *exit_code, absl::FormatDuration(stop_time).c_str());
}

// ---------------------------------------------------------------------------------------------------
// h. Health, reflection, ListLayers, GetLayer.

TEST_F(ServerTest, HealthReflectionAndLayers) {
  START_OR_RETURN(server, "health");
  namespace health_v1 = grpc::health::v1;
  namespace refl = grpc::reflection::v1alpha;

  auto health = health_v1::Health::NewStub(server->channel);
  for (const char* service : {"", "attnserve.v1.AttentionService"}) {
    grpc::ClientContext ctx;
    health_v1::HealthCheckRequest request;
    request.set_service(service);
    health_v1::HealthCheckResponse response;
    const grpc::Status status = health->Check(&ctx, request, &response);
    ASSERT_TRUE(status.ok()) << "'" << service << "': " << Str(status);
    EXPECT_EQ(response.status(), health_v1::HealthCheckResponse::SERVING) << "'" << service << "'";
  }
  {
    grpc::ClientContext ctx;
    health_v1::HealthCheckRequest request;
    request.set_service("no.such.Service");
    health_v1::HealthCheckResponse response;
    EXPECT_EQ(health->Check(&ctx, request, &response).error_code(), grpc::StatusCode::NOT_FOUND);
  }

  auto reflection = refl::ServerReflection::NewStub(server->channel);
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(absl::Seconds(30)));
    auto stream = reflection->ServerReflectionInfo(&ctx);
    refl::ServerReflectionRequest request;
    refl::ServerReflectionResponse response;
    request.set_list_services("");
    ASSERT_TRUE(stream->Write(request));
    ASSERT_TRUE(stream->Read(&response));
    ASSERT_TRUE(response.has_list_services_response()) << response.DebugString();
    std::set<std::string> services;
    for (const auto& s : response.list_services_response().service()) services.insert(s.name());
    EXPECT_EQ(services.count("attnserve.v1.AttentionService"), 1u) << absl::StrJoin(services, ", ");
    EXPECT_EQ(services.count("grpc.health.v1.Health"), 1u) << absl::StrJoin(services, ", ");

    request.set_file_containing_symbol("attnserve.v1.AttentionService");
    ASSERT_TRUE(stream->Write(request));
    ASSERT_TRUE(stream->Read(&response));
    ASSERT_TRUE(response.has_file_descriptor_response()) << response.DebugString();
    bool found = false;
    std::vector<std::string> names;
    for (const std::string& bytes : response.file_descriptor_response().file_descriptor_proto()) {
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

    request.set_file_containing_symbol("no.such.Symbol");
    ASSERT_TRUE(stream->Write(request));
    ASSERT_TRUE(stream->Read(&response));
    EXPECT_TRUE(response.has_error_response()) << response.DebugString();
    EXPECT_EQ(response.error_response().error_code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));

    stream->WritesDone();
    EXPECT_FALSE(stream->Read(&response));
    const grpc::Status status = stream->Finish();
    EXPECT_TRUE(status.ok()) << Str(status);
  }

  {
    grpc::ClientContext ctx;
    v1::ListLayersResponse response;
    const grpc::Status status = server->stub->ListLayers(&ctx, v1::ListLayersRequest(), &response);
    ASSERT_TRUE(status.ok()) << Str(status);
    std::vector<std::string> names;
    for (const v1::Layer& l : response.layers()) {
      names.push_back(l.config().name());
      EXPECT_TRUE(l.ready()) << l.config().name();
    }
    EXPECT_EQ(names, (std::vector<std::string>{"small", "base"}));
  }
  {
    grpc::ClientContext ctx;
    v1::GetLayerRequest request;
    request.set_name("base");
    v1::Layer layer;
    const grpc::Status status = server->stub->GetLayer(&ctx, request, &layer);
    ASSERT_TRUE(status.ok()) << Str(status);
    EXPECT_EQ(layer.config().name(), "base");
    EXPECT_EQ(layer.config().embed_dim(), 768);
    EXPECT_EQ(layer.config().num_heads(), 12);
    EXPECT_EQ(layer.config().kdim(), 768) << "defaults filled in";
    EXPECT_TRUE(layer.ready());
  }
  {
    grpc::ClientContext ctx;
    v1::GetLayerRequest request;
    request.set_name("nope");
    v1::Layer layer;
    const grpc::Status status = server->stub->GetLayer(&ctx, request, &layer);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << Str(status);
    EXPECT_THAT(status.error_message(), HasSubstr("nope"));
  }
}

// ---------------------------------------------------------------------------------------------------
// i. A real Prometheus scrapes /metrics.

TEST_F(ServerTest, PrometheusScrapes) {
  const std::string prometheus = ATTNSERVE_PROMETHEUS;
  ASSERT_FALSE(prometheus.empty()) << "the prometheus binary was not found when configuring (find_program)";
  ASSERT_EQ(access(prometheus.c_str(), X_OK), 0) << prometheus << " is not executable";
  START_OR_RETURN(server, "prometheus");

  const std::string dir = TempPath("prometheus");
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir + "/data");
  const std::string config_path = dir + "/prometheus.yml";
  WriteFile(config_path, absl::StrCat("global:\n"
                                      "  scrape_interval: 1s\n"
                                      "  evaluation_interval: 1s\n"
                                      "scrape_configs:\n"
                                      "  - job_name: attnserve\n"
                                      "    scrape_interval: 1s\n"
                                      "    scrape_timeout: 1s\n"
                                      "    static_configs:\n"
                                      "      - targets: ['127.0.0.1:",
                                      server->metrics_port, "']\n"));
  const int web_port = FreePort();
  ASSERT_GT(web_port, 0);
  absl::StatusOr<std::unique_ptr<at::Subprocess>> prom =
      at::Subprocess::Start({prometheus, "--config.file=" + config_path, "--storage.tsdb.path=" + dir + "/data",
                             absl::StrCat("--web.listen-address=127.0.0.1:", web_port), "--log.level=info"},
                            dir + "/prometheus.log");
  ASSERT_TRUE(prom.ok()) << prom.status();
  at::Subprocess* prometheus_process = Own(std::move(*prom));

  // Ready?
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  absl::StatusOr<std::string> ready = absl::UnavailableError("not asked yet");
  while (absl::Now() < deadline && prometheus_process->Running()) {
    ready = at::HttpGet("127.0.0.1", web_port, "/-/ready", absl::Seconds(2));
    if (ready.ok()) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_TRUE(ready.ok()) << "prometheus not ready: " << ready.status();

  std::mt19937_64 rng(61);
  constexpr int kRequests = 5;
  for (int i = 0; i < kRequests; ++i) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(absl::Seconds(30)));
    v1::InferResponse response;
    const grpc::Status status = server->stub->Infer(&ctx, SelfAttention(rng, "small", 256, 1, 8).ToProto(), &response);
    ASSERT_TRUE(status.ok()) << Str(status);
  }

  // Poll the query API until the series shows, then until its small/OK sample counts our requests.
  std::string body;
  bool found = false, counted = false;
  while (absl::Now() < deadline + absl::Seconds(15)) {
    absl::StatusOr<std::string> r =
        at::HttpGet("127.0.0.1", web_port, "/api/v1/query?query=attnserve_requests_total", absl::Seconds(5));
    if (r.ok()) {
      body = *r;
      if (body.find("\"attnserve_requests_total\"") != std::string::npos) {
        found = true;
        nlohmann::json json = nlohmann::json::parse(body, nullptr, /*allow_exceptions=*/false);
        if (!json.is_discarded() && json.value("status", "") == "success") {
          for (const auto& series : json["data"]["result"]) {
            if (series["metric"].value("layer", "") == "small" && series["metric"].value("code", "") == "OK" &&
                series["value"][1] == std::to_string(kRequests)) {
              counted = true;
            }
          }
        }
        if (counted) break;
      }
    } else {
      body = r.status().ToString();
    }
    absl::SleepFor(absl::Milliseconds(250));
  }
  std::printf("prometheus /api/v1/query?query=attnserve_requests_total:\n%s\n", body.c_str());
  EXPECT_TRUE(found) << "the query never returned attnserve_requests_total: " << body;
  EXPECT_TRUE(counted) << "no sample {layer=\"small\",code=\"OK\"} = " << kRequests << ": " << body;

  ASSERT_TRUE(prometheus_process->Signal(SIGTERM).ok());
  absl::StatusOr<int> exit_code = prometheus_process->WaitForExit(absl::Seconds(20));
  EXPECT_TRUE(exit_code.ok()) << exit_code.status();
}

}  // namespace
}  // namespace attnserve
