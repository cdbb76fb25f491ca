#include "tests/testing/server_harness.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <omp.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <thread>
#include <tuple>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "core/mha_weights.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "grpc_health_v1.grpc.pb.h"
#include "server/startup/server_config.h"
#include "tests/testing/http_get.h"
#include "tests/testing/naive_mha.h"
#include "tests/testing/safetensors_writer.h"

namespace attnserve::testing {
namespace {

constexpr absl::Duration kStartTimeout = absl::Seconds(60);
constexpr absl::Duration kConnectTimeout = absl::Seconds(30);
constexpr absl::Duration kDrainTimeout = absl::Seconds(30);

// Removes the run's files when every test passed; kept for a look otherwise.
class RemoveTempDirOnSuccess : public ::testing::Environment {
 public:
  void TearDown() override {
    std::error_code ignored;
    if (!std::filesystem::exists(TempDirOfRun(), ignored)) return;
    if (::testing::UnitTest::GetInstance()->Passed()) {
      std::filesystem::remove_all(TempDirOfRun(), ignored);
    } else {
      std::fprintf(stderr, "logs and configs kept in %s\n", TempDirOfRun().c_str());
    }
  }
};
[[maybe_unused]] ::testing::Environment* const kRemoveTempDir =
    ::testing::AddGlobalTestEnvironment(new RemoveTempDirOnSuccess);

// Parse errors of a config given in text format, "LINE:COL: message" (1-based).
class CollectErrors final : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column, const std::string& message) override {
    errors.push_back(absl::StrCat(line + 1, ":", column + 1, ": ", message));
  }
  std::vector<std::string> errors;
};

absl::StatusOr<v1::ServerConfig> ParseConfig(const std::string& pbtxt) {
  if (pbtxt.empty()) return DefaultServerConfig();
  v1::ServerConfig config;
  CollectErrors errors;
  google::protobuf::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(pbtxt, &config)) {
    return absl::InvalidArgumentError(absl::StrCat("config: ", absl::StrJoin(errors.errors, "; ")));
  }
  return config;
}

// Sets the server's channel and stub once it accepts connections.
absl::Status Connect(TestServer& server) {
  server.channel = MakeChannel(server.grpc_port);
  if (!server.channel->WaitForConnected(In(kConnectTimeout))) {
    return absl::UnavailableError(absl::StrCat("cannot connect to 127.0.0.1:", server.grpc_port));
  }
  server.stub = v1::AttentionService::NewStub(server.channel);
  return absl::OkStatus();
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Files, channels, time.

const std::string& TempDirOfRun() {
  static const std::string* const dir = new std::string(
      (std::filesystem::path(::testing::TempDir()) / absl::StrCat("attnserve_test_", getpid())).string());
  return *dir;
}

std::string TempPath(const std::string& name) {
  std::filesystem::create_directories(TempDirOfRun());
  return (std::filesystem::path(TempDirOfRun()) / name).string();
}

std::string Str(const grpc::Status& status) {
  return absl::StrCat("code ", static_cast<int>(status.error_code()), " '", status.error_message(), "'");
}

std::shared_ptr<grpc::Channel> MakeChannel(int port) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  return grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials(), args);
}

std::chrono::system_clock::time_point In(absl::Duration d) { return absl::ToChronoTime(absl::Now() + d); }

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

bool WaitFor(const std::function<bool()>& condition, absl::Duration timeout, absl::Duration interval) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!condition()) {
    if (absl::Now() >= deadline) return condition();
    absl::SleepFor(interval);
  }
  return true;
}

// ---------------------------------------------------------------------------------------------------
// The server under test.

TestServer::~TestServer() {
  stub.reset();
  channel.reset();
  if (server == nullptr) return;
  if (const absl::Status drained = server->Drain(absl::Now() + kDrainTimeout); !drained.ok()) {
    ADD_FAILURE() << "the in-process server did not drain within " << kDrainTimeout << ": " << drained;
    (void)server.release();  // its batches still run: it must not be destroyed (Server::Drain)
  }
}

absl::StatusOr<std::string> TestServer::Metrics() const { return HttpGet("127.0.0.1", metrics_port, "/metrics"); }

void QuietServerLogs::SetUp() { spdlog::set_level(spdlog::level::err); }

absl::StatusOr<std::unique_ptr<TestServer>> StartInProcessServer(const std::string& config_pbtxt,
                                                                 const ServerOptions& options) {
  absl::StatusOr<v1::ServerConfig> config = ParseConfig(config_pbtxt);
  if (!config.ok()) return config.status();
  config->set_grpc_address("127.0.0.1:0");
  config->set_metrics_address("127.0.0.1:0");
  // No memory guard, connection cap or reset-flood guard: they read and shut down the process's sockets, which
  // here are also the test's clients' and other servers' (the guard's delivered-bytes table is the process's:
  // one server per process). The binary's tests (hostile_test) cover them.
  config->mutable_transport()->set_memory_guard_interval_ms(-1);
  config->mutable_transport()->set_max_connections(-1);
  config->mutable_transport()->set_reset_flood_check_interval_ms(-1);
  if (absl::Status s = ApplyDefaultsAndValidate(&*config); !s.ok()) return s;
  auto server = std::make_unique<TestServer>();
  absl::StatusOr<std::unique_ptr<Server>> created = Server::Create(*config, options);
  if (!created.ok()) return created.status();
  server->server = std::move(*created);
  if (absl::Status s = server->server->Start(); !s.ok()) return s;
  server->grpc_port = server->server->ports().grpc;
  server->metrics_port = server->server->ports().metrics;
  if (absl::Status s = Connect(*server); !s.ok()) return s;
  return server;
}

absl::StatusOr<std::unique_ptr<TestServer>> StartServerProcess(const std::string& binary, const std::string& name,
                                                               const std::string& config_pbtxt,
                                                               const std::vector<std::string>& extra_args) {
  std::vector<std::string> args = {binary, "--grpc-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0"};
  if (!config_pbtxt.empty()) {
    const std::string path = TempPath(name + ".pbtxt");
    if (absl::Status s = WriteFile(path, config_pbtxt); !s.ok()) return s;
    args.insert(args.end(), {"--config", path});
  }
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  auto server = std::make_unique<TestServer>();
  absl::StatusOr<std::unique_ptr<Subprocess>> process = Subprocess::Start(args, TempPath(name + ".log"));
  if (!process.ok()) return process.status();
  server->process = std::move(*process);
  absl::StatusOr<std::vector<std::string>> ready =
      server->process->WaitForLogRegex(R"(ready: grpc_port=(\d+) metrics_port=(\d+))", kStartTimeout);
  if (!ready.ok()) return ready.status();
  if (!absl::SimpleAtoi((*ready)[1], &server->grpc_port) || !absl::SimpleAtoi((*ready)[2], &server->metrics_port) ||
      server->grpc_port <= 0 || server->metrics_port <= 0) {
    return absl::InternalError(absl::StrCat("bad ready line: ", (*ready)[0]));
  }
  if (absl::Status s = Connect(*server); !s.ok()) return s;
  return server;
}

// ---------------------------------------------------------------------------------------------------
// Metrics.

namespace {

// Parses `{k="v",...}` starting at line[open] into *labels; the position after '}', or npos when malformed.
size_t ParseLabels(const std::string& line, size_t open, Labels* labels) {
  const size_t end = line.find('}', open);
  if (end == std::string::npos) return std::string::npos;
  const std::string body = line.substr(open + 1, end - open - 1);
  size_t i = 0;
  while (i < body.size()) {
    const size_t eq = body.find('=', i);
    if (eq == std::string::npos || eq + 1 >= body.size() || body[eq + 1] != '"') break;
    const size_t close = body.find('"', eq + 2);
    if (close == std::string::npos) break;
    (*labels)[body.substr(i, eq - i)] = body.substr(eq + 2, close - eq - 2);
    i = close + 1;
    if (i < body.size() && body[i] == ',') ++i;
  }
  return end + 1;
}

bool Includes(const Labels& labels, const Labels& wanted) {
  for (const auto& [k, v] : wanted) {
    auto it = labels.find(k);
    if (it == labels.end() || it->second != v) return false;
  }
  return true;
}

}  // namespace

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
    if (line[pos] == '{') pos = ParseLabels(line, pos, &s.labels);
    if (pos == std::string::npos) continue;
    s.value = std::strtod(line.c_str() + pos, nullptr);
    samples.push_back(std::move(s));
  }
  return samples;
}

std::optional<double> MetricValue(const std::string& text, const std::string& name, const Labels& labels) {
  for (const Sample& s : ParseMetrics(text)) {
    if (s.name == name && Includes(s.labels, labels)) return s.value;
  }
  return std::nullopt;
}

std::string MetricLines(const std::string& text, const std::string& name) {
  std::istringstream in(text);
  std::string line, out;
  while (std::getline(in, line)) {
    if (line.rfind(name, 0) == 0) absl::StrAppend(&out, line, "\n");
  }
  return out;
}

bool PollMetrics(const TestServer& server, const std::function<bool(const std::string&)>& pred, absl::Duration timeout,
                 std::string* last) {
  return WaitFor(
      [&] {
        absl::StatusOr<std::string> text = server.Metrics();
        *last = text.ok() ? *text : absl::StrCat("(scrape failed: ", text.status().ToString(), ")");
        return text.ok() && pred(*text);
      },
      timeout, absl::Milliseconds(20));
}

std::map<Labels, double> CollectSeries(const prometheus::Registry& registry, const std::string& name) {
  std::map<Labels, double> series;
  for (const prometheus::MetricFamily& family : registry.Collect()) {
    if (family.name != name) continue;
    for (const prometheus::ClientMetric& metric : family.metric) {
      Labels labels;
      for (const auto& label : metric.label) labels[label.name] = label.value;
      switch (family.type) {
        case prometheus::MetricType::Counter:
          series[labels] = metric.counter.value;
          break;
        case prometheus::MetricType::Gauge:
          series[labels] = metric.gauge.value;
          break;
        case prometheus::MetricType::Untyped:
          series[labels] = metric.untyped.value;
          break;
        default:
          break;
      }
    }
  }
  return series;
}

std::optional<double> CollectedValue(const prometheus::Registry& registry, const std::string& name,
                                     const Labels& labels) {
  const std::map<Labels, double> series = CollectSeries(registry, name);
  auto it = series.find(labels);
  if (it == series.end()) return std::nullopt;
  return it->second;
}

std::string SeriesToString(const std::map<Labels, double>& series) {
  std::string out;
  for (const auto& [labels, value] : series) {
    absl::StrAppend(
        &out, "  {",
        absl::StrJoin(labels, ",",
                      [](std::string* o, const auto& kv) { absl::StrAppend(o, kv.first, "=\"", kv.second, "\""); }),
        "} = ", value, "\n");
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Requests.

TensorView HostTensor::view() const {
  if (!present()) return TensorView{};
  return is_bool ? TensorView::Bool(b.data(), shape) : TensorView::F32(f.data(), shape);
}

HostTensor RandomF32(std::mt19937_64& rng, Shape shape) {
  HostTensor t;
  t.shape = std::move(shape);
  t.f = RandomValues(rng, NumElements(t.shape));
  return t;
}

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

v1::InferRequest HostRequest::ToProto(Encoding enc) const {
  v1::InferRequest r;
  r.set_layer(layer);
  r.set_id(id);
  ::attnserve::testing::ToProto(query, enc, r.mutable_query());
  if (key.present()) ::attnserve::testing::ToProto(key, enc, r.mutable_key());
  if (value.present()) ::attnserve::testing::ToProto(value, enc, r.mutable_value());
  if (key_padding_mask.present()) ::attnserve::testing::ToProto(key_padding_mask, enc, r.mutable_key_padding_mask());
  if (attn_mask.present()) ::attnserve::testing::ToProto(attn_mask, enc, r.mutable_attn_mask());
  r.set_is_causal(is_causal);
  r.set_need_weights(need_weights);
  if (average_attn_weights.has_value()) r.set_average_attn_weights(*average_attn_weights);
  return r;
}

AttentionInputs HostRequest::Inputs() const {
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

HostRequest SelfAttention(std::mt19937_64& rng, const std::string& layer, int64_t embed_dim, int64_t batch,
                          int64_t len) {
  HostRequest r;
  r.layer = layer;
  r.query = RandomF32(rng, batch == 0 ? Shape{len, embed_dim} : Shape{batch, len, embed_dim});
  return r;
}

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

const MultiheadAttention& Small() { return Engine(256, 4, 1); }
const MultiheadAttention& Base() { return Engine(768, 12, 2); }

AttentionOutputs Expected(const MultiheadAttention& engine, const HostRequest& request) {
  // One OpenMP thread for the references (computed on the test's thread): on a shared, loaded machine a
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

::testing::AssertionResult Matches(const v1::InferResponse& response, const AttentionOutputs& want, bool need_weights) {
  if (response.has_error()) {
    return ::testing::AssertionFailure() << "response carries error " << response.error().code() << " '"
                                         << response.error().message() << "'";
  }
  std::vector<float> got;
  if (std::string e = DecodeF32(response.output(), want.output.shape, &got); !e.empty()) {
    return ::testing::AssertionFailure() << "output: " << e;
  }
  const double out_diff = MaxAbsDiff(got, want.output.values);
  if (!(out_diff <= kTolerance)) return ::testing::AssertionFailure() << "output: max abs diff " << out_diff;
  if (need_weights) {
    if (std::string e = DecodeF32(response.attn_weights(), want.attn_weights.shape, &got); !e.empty()) {
      return ::testing::AssertionFailure() << "attn_weights: " << e;
    }
    const double w_diff = MaxAbsDiff(got, want.attn_weights.values);
    if (!(w_diff <= kTolerance)) return ::testing::AssertionFailure() << "attn_weights: max abs diff " << w_diff;
  } else if (response.attn_weights().shape_size() != 0 || !response.attn_weights().raw_data().empty()) {
    return ::testing::AssertionFailure() << "attn_weights present although need_weights was false";
  }
  return ::testing::AssertionSuccess();
}

grpc::Status RunStream(v1::AttentionService::Stub& stub, const std::vector<v1::InferRequest>& requests,
                       absl::Duration timeout, std::vector<v1::InferResponse>* responses) {
  grpc::ClientContext ctx;
  ctx.set_deadline(In(timeout));
  auto stream = stub.InferStream(&ctx);
  std::thread reader([&] {
    v1::InferResponse response;
    while (stream->Read(&response)) responses->push_back(response);
  });
  for (const v1::InferRequest& r : requests) {
    if (!stream->Write(r)) {
      ADD_FAILURE() << "Write failed at id " << r.id();
      break;
    }
  }
  stream->WritesDone();
  reader.join();
  return stream->Finish();
}

std::string HealthStatus(const std::shared_ptr<grpc::Channel>& channel, const std::string& service,
                         absl::Duration timeout) {
  namespace health_v1 = grpc::health::v1;
  auto health = health_v1::Health::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(In(timeout));
  health_v1::HealthCheckRequest request;
  request.set_service(service);
  health_v1::HealthCheckResponse response;
  const grpc::Status status = health->Check(&ctx, request, &response);
  if (!status.ok()) {
    // gRPC's codes are absl's, with the same canonical names.
    return absl::StrCat(absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code())), ": ",
                        status.error_message());
  }
  return health_v1::HealthCheckResponse::ServingStatus_Name(response.status());
}

ClientsUntilRefused::ClientsUntilRefused(v1::AttentionService::Stub* stub,
                                         const std::vector<v1::InferRequest>* requests,
                                         const std::vector<AttentionOutputs>* wants, int clients, int per_client)
    : stub_(stub), requests_(requests), wants_(wants), clients_(clients) {
  for (int c = 0; c < clients; ++c) threads_.emplace_back([this, c, per_client] { Send(c, per_client); });
}

bool ClientsUntilRefused::AwaitAnswers(int n, absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto enough = [this, n]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return ok_ >= n || stopped_ == clients_; };
  mu_.AwaitWithTimeout(absl::Condition(&enough), timeout);
  return ok_ >= n;
}

void ClientsUntilRefused::Join() {
  for (std::thread& t : threads_) t.join();
  threads_.clear();
}

int ClientsUntilRefused::Get(int ClientsUntilRefused::*counter) const {
  absl::MutexLock lock(&mu_);
  return this->*counter;
}

void ClientsUntilRefused::Send(int client, int per_client) {
  for (int i = 0; i < per_client; ++i) {
    if (!Call(client, static_cast<size_t>(client + i) % requests_->size())) break;
  }
  absl::MutexLock lock(&mu_);
  ++stopped_;
}

bool ClientsUntilRefused::Call(int client, size_t which) {
  grpc::ClientContext ctx;
  ctx.set_deadline(In(absl::Seconds(60)));
  v1::InferResponse response;
  const grpc::Status status = stub_->Infer(&ctx, (*requests_)[which], &response);
  const grpc::StatusCode code = status.error_code();
  if (status.ok()) {
    if (auto m = Matches(response, (*wants_)[which], false); !m) failures_.Add(m.message());
  } else if (code != grpc::StatusCode::UNAVAILABLE && code != grpc::StatusCode::CANCELLED) {
    failures_.Add(absl::StrCat("client ", client, ": ", Str(status)));
  }
  absl::MutexLock lock(&mu_);
  ok_ += status.ok() ? 1 : 0;
  unavailable_ += code == grpc::StatusCode::UNAVAILABLE ? 1 : 0;
  cancelled_ += code == grpc::StatusCode::CANCELLED ? 1 : 0;
  return status.ok();
}

// ---------------------------------------------------------------------------------------------------
// Malformed requests.

BadRequest MakeBad(Bad kind, std::mt19937_64& rng, const std::string& id) {
  BadRequest bad;
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

// ---------------------------------------------------------------------------------------------------

void Failures::Add(std::string what) {
  absl::MutexLock lock(&mu_);
  ++count_;
  if (first_.size() < 10) first_.push_back(std::move(what));
}

int Failures::count() const {
  absl::MutexLock lock(&mu_);
  return count_;
}

std::string Failures::Summary() const {
  absl::MutexLock lock(&mu_);
  return absl::StrCat(count_, " failure(s), first: \n  ", absl::StrJoin(first_, "\n  "));
}

}  // namespace attnserve::testing
