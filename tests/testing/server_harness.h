// What the server's tests share: a server under test (in-process or the attnserve binary, behind the same
// channel, stub, ports and Metrics()), requests built on the host with their reference answers (the layer
// built in-process: MultiheadAttention::Create with RandomMhaWeights(config, seed), which is what the server
// does for a layer without weights_path), malformed requests with the error each must get, and readers of
// the Prometheus metrics (scraped text, or the registry of an in-process server).
//
// Not linked here: the test-only grpc.reflection.v1alpha stubs of attnserve_test_protos. gRPC's reflection
// library, which an in-process server loads, registers the same proto symbols, and protobuf aborts at start-up
// on the clash (see attention_service_test.cc for a reflection client that needs no stubs).
#pragma once

#include <grpcpp/grpcpp.h>
#include <prometheus/registry.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "attnserve/v1/attention.grpc.pb.h"
#include "core/attention_inputs.h"
#include "core/multihead_attention.h"
#include "gtest/gtest.h"
#include "server/server.h"
#include "tests/testing/subprocess.h"

namespace attnserve::testing {

namespace v1 = attnserve::v1;

inline constexpr double kTolerance = 1e-5;
// Requests carry whole tensors: the server's own limit, not gRPC's 4 MiB default.
inline constexpr int kMaxMessageBytes = 64 << 20;

// ---------------------------------------------------------------------------------------------------
// Files, channels, time.

// A directory of this process (so concurrent runs never share a file), removed at the end of a run in which
// every test passed and kept (and named on stderr) otherwise.
const std::string& TempDirOfRun();
// TempDirOfRun()/name, creating the directory. (WriteFile: tests/testing/safetensors_writer.h.)
std::string TempPath(const std::string& name);

// "code N 'message'", for failure messages.
std::string Str(const grpc::Status& status);
// A channel to 127.0.0.1:port with the server's message size limits.
std::shared_ptr<grpc::Channel> MakeChannel(int port);
// A gRPC deadline `d` from now.
std::chrono::system_clock::time_point In(absl::Duration d);
// A free loopback TCP port (bound to port 0, read back, closed); 0 on error.
int FreePort();
// Polls `condition` every `interval` until it holds (true) or `timeout` has passed (false, after a last look).
bool WaitFor(const std::function<bool()>& condition, absl::Duration timeout,
             absl::Duration interval = absl::Milliseconds(10));

// A test environment under which a server logs errors only: it logs a warning for every refused request, and
// the service tests send hundreds on purpose. A test file registers it at namespace scope:
//   [[maybe_unused]] ::testing::Environment* const kQuietLogs = ::testing::AddGlobalTestEnvironment(new
//   QuietServerLogs);
class QuietServerLogs : public ::testing::Environment {
 public:
  void SetUp() override;
};

// ---------------------------------------------------------------------------------------------------
// The server under test.

struct TestServer {
  TestServer() = default;
  TestServer(const TestServer&) = delete;
  TestServer& operator=(const TestServer&) = delete;
  // An in-process server is drained first (30 s at most: a test that left a call hanging fails, and the server
  // is leaked rather than destroyed under its running batches); a process is SIGKILLed if still running.
  ~TestServer();

  std::unique_ptr<Server> server;       // in-process; null for a process
  std::unique_ptr<Subprocess> process;  // the attnserve process; null in-process
  int grpc_port = 0;
  int metrics_port = 0;
  std::shared_ptr<grpc::Channel> channel;  // connected
  std::unique_ptr<v1::AttentionService::Stub> stub;

  // GET /metrics.
  absl::StatusOr<std::string> Metrics() const;
};

// A server in this process: `config_pbtxt` (a ServerConfig in text format; empty: DefaultServerConfig()) on
// 127.0.0.1:0 for gRPC and /metrics, without the memory guard and the connection cap (see the .cc), defaults
// applied, created with `options`, started and connected.
absl::StatusOr<std::unique_ptr<TestServer>> StartInProcessServer(const std::string& config_pbtxt = "",
                                                                 const ServerOptions& options = ServerOptions{});

// The attnserve `binary` on 127.0.0.1:0 for gRPC and /metrics, with `config_pbtxt` written to
// TempPath(name + ".pbtxt") (empty: no --config, the embedded default) and `extra_args`, its log in
// TempPath(name + ".log"); waits for its "ready" line and a connected channel.
absl::StatusOr<std::unique_ptr<TestServer>> StartServerProcess(const std::string& binary, const std::string& name,
                                                               const std::string& config_pbtxt,
                                                               const std::vector<std::string>& extra_args = {});

// ---------------------------------------------------------------------------------------------------
// Metrics: Prometheus' text format (/metrics), and the registry of an in-process server.

using Labels = std::map<std::string, std::string>;

struct Sample {
  std::string name;
  Labels labels;
  double value = 0;
};

std::vector<Sample> ParseMetrics(const std::string& text);
// The value of the first sample named `name` whose labels include `labels`.
std::optional<double> MetricValue(const std::string& text, const std::string& name, const Labels& labels = {});
// The lines of `text` about `name`, for failure messages.
std::string MetricLines(const std::string& text, const std::string& name);
// Polls server.Metrics() until pred holds; false on timeout. *last holds the last text read.
bool PollMetrics(const TestServer& server, const std::function<bool(const std::string&)>& pred, absl::Duration timeout,
                 std::string* last);

// Every series of the counter, gauge or untyped family `name` in `registry`, by labels (histograms and
// summaries are not read).
std::map<Labels, double> CollectSeries(const prometheus::Registry& registry, const std::string& name);
// The series of `name` with exactly `labels`, if present.
std::optional<double> CollectedValue(const prometheus::Registry& registry, const std::string& name,
                                     const Labels& labels = {});
// "{a="x",b="y"} = 3" lines, for failure messages.
std::string SeriesToString(const std::map<Labels, double>& series);

// ---------------------------------------------------------------------------------------------------
// Requests built on the host side, their protobuf form and their in-process answer.

struct HostTensor {
  Shape shape;
  std::vector<float> f;    // FLOAT32 values
  std::vector<uint8_t> b;  // BOOL values, when is_bool
  bool is_bool = false;

  bool present() const { return !shape.empty(); }
  TensorView view() const;
};

enum class Encoding { kRaw, kRepeated };  // raw_data, or float_data / bool_data

HostTensor RandomF32(std::mt19937_64& rng, Shape shape);
// Random BOOL values, the first of each row false so that no row is masked out entirely.
HostTensor RandomBoolMask(std::mt19937_64& rng, Shape shape);
void ToProto(const HostTensor& t, Encoding enc, v1::Tensor* out);

struct HostRequest {
  std::string layer;
  std::string id;
  HostTensor query, key, value, key_padding_mask, attn_mask;
  bool is_causal = false;
  bool need_weights = false;
  std::optional<bool> average_attn_weights;

  v1::InferRequest ToProto(Encoding enc = Encoding::kRaw) const;
  AttentionInputs Inputs() const;
};

// A self-attention request [B, L, E] (or [L, E] when batch == 0) with random values.
HostRequest SelfAttention(std::mt19937_64& rng, const std::string& layer, int64_t embed_dim, int64_t batch,
                          int64_t len);

// The in-process twin of a served seeded layer, built once per (E, H, seed).
const MultiheadAttention& Engine(int64_t embed_dim, int64_t num_heads, uint64_t seed);
// The layers of the embedded default config.
const MultiheadAttention& Small();  // "small": E = 256, H = 4, seed 1
const MultiheadAttention& Base();   // "base": E = 768, H = 12, seed 2

// The engine's answer to `request`, on one OpenMP thread (a test failure if Forward fails).
AttentionOutputs Expected(const MultiheadAttention& engine, const HostRequest& request);

// "" when `t` is a FLOAT32 tensor in raw_data of `shape`, and fills `values`; what is wrong otherwise.
std::string DecodeF32(const v1::Tensor& t, const Shape& shape, std::vector<float>* values);

// Compares an answer with the in-process result: output (and attn_weights when asked for) within kTolerance.
::testing::AssertionResult Matches(const v1::InferResponse& response, const AttentionOutputs& want, bool need_weights);

// ---------------------------------------------------------------------------------------------------
// Clients: streams, health, many threads.

// Collects the first few failures of many threads.
class Failures {
 public:
  void Add(std::string what);
  int count() const;
  std::string Summary() const;

 private:
  mutable absl::Mutex mu_;
  int count_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::string> first_ ABSL_GUARDED_BY(mu_);
};

// Writes `requests` on one InferStream, reading concurrently, and closes it; the responses in the order
// they came and the stream's final status.
grpc::Status RunStream(v1::AttentionService::Stub& stub, const std::vector<v1::InferRequest>& requests,
                       absl::Duration timeout, std::vector<v1::InferResponse>* responses);

// Health.Check(service): "SERVING", "NOT_SERVING", ..., or the call's error as "CODE: message" (canonical
// code names, e.g. "UNAVAILABLE: ...").
std::string HealthStatus(const std::shared_ptr<grpc::Channel>& channel, const std::string& service,
                         absl::Duration timeout = absl::Seconds(10));

// Clients sending up to `per_client` requests each (`requests` in turn, each checked against its `wants`
// entry) and stopping at their first UNAVAILABLE or CANCELLED: a draining server's refusals (UNAVAILABLE
// while it lingers, CANCELLED from gRPC's own shutdown). Any other error stops the client as a failure.
// The destructor joins them.
class ClientsUntilRefused {
 public:
  // The pointers must outlive the clients.
  ClientsUntilRefused(v1::AttentionService::Stub* stub, const std::vector<v1::InferRequest>* requests,
                      const std::vector<AttentionOutputs>* wants, int clients, int per_client);
  ~ClientsUntilRefused() { Join(); }
  ClientsUntilRefused(const ClientsUntilRefused&) = delete;
  ClientsUntilRefused& operator=(const ClientsUntilRefused&) = delete;

  // True once `n` requests were answered OK; false after `timeout` or once every client has stopped.
  bool AwaitAnswers(int n, absl::Duration timeout);
  void Join();
  int ok() const { return Get(&ClientsUntilRefused::ok_); }
  int unavailable() const { return Get(&ClientsUntilRefused::unavailable_); }
  int cancelled() const { return Get(&ClientsUntilRefused::cancelled_); }
  const Failures& failures() const { return failures_; }

 private:
  int Get(int ClientsUntilRefused::*counter) const;
  void Send(int client, int per_client);
  bool Call(int client, size_t which);  // one request; false when the client stops

  v1::AttentionService::Stub* const stub_;
  const std::vector<v1::InferRequest>* const requests_;
  const std::vector<AttentionOutputs>* const wants_;
  const int clients_;
  Failures failures_;
  mutable absl::Mutex mu_;
  int ok_ ABSL_GUARDED_BY(mu_) = 0;
  int unavailable_ ABSL_GUARDED_BY(mu_) = 0;
  int cancelled_ ABSL_GUARDED_BY(mu_) = 0;
  int stopped_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::thread> threads_;
};

// ---------------------------------------------------------------------------------------------------
// Malformed requests on "small" (E = 256), each with the code and message fragments it must get.

enum class Bad { kWrongLastDim, kRawBytes, kRawAndFloat, kMaskShape, kBoolQuery, kUnknownLayer };
inline constexpr Bad kAllBad[] = {Bad::kWrongLastDim, Bad::kRawBytes,  Bad::kRawAndFloat,
                                  Bad::kMaskShape,    Bad::kBoolQuery, Bad::kUnknownLayer};

struct BadRequest {
  v1::InferRequest request;
  grpc::StatusCode code = grpc::StatusCode::INVALID_ARGUMENT;
  std::vector<std::string> fragments;  // each must appear in the error message
};

BadRequest MakeBad(Bad kind, std::mt19937_64& rng, const std::string& id);
// "" when (code, message) is what `bad` must get; what is wrong otherwise.
std::string CheckBadStatus(const BadRequest& bad, grpc::StatusCode code, const std::string& message);

}  // namespace attnserve::testing
