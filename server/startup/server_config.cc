#include "server/startup/server_config.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "server/startup/layer_options.h"
#include "server/startup/transport_config.h"
#include "common/log_string.h"
#include "common/status_macros.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/json_util.h"

namespace attnserve {
namespace {

using attnserve::v1::BatchingConfig;
using attnserve::v1::LayerConfig;
using attnserve::v1::ServerConfig;

// Kept identical to deploy/config/default.pbtxt so that file is a tested, working example.
constexpr char kDefaultServerConfigPbtxt[] =
    R"pb(# attnserve's built-in configuration, served when no --config is given.
# Protobuf text format of attnserve.v1.ServerConfig (proto/attnserve/v1/config.proto).

# host:port for gRPC; flag --grpc-address / env ATTNSERVE_GRPC_ADDRESS override it.
grpc_address: "0.0.0.0:50051"
# host:port for Prometheus /metrics; --metrics-address / ATTNSERVE_METRICS_ADDRESS override it.
metrics_address: "0.0.0.0:9464"
# Threads computing batches; 0 = one per CPU. A batch computing alone uses every CPU through oneDNN;
# batches computing at once divide them.
worker_threads: 0

layers {
  name: "small"
  embed_dim: 256
  num_heads: 4
  # No weights_path: seeded random weights.
  seed: 1
  # Omitted fields take their defaults: bias true, kdim = vdim = embed_dim,
  # max_sequence_length 4096, and batching as below.
  # batching {
  #   max_batch_size: 32        # 1 disables batching
  #   max_queue_delay_us: 0     # 0: eager, run as soon as a worker is free
  #   max_queue_size: 1024      # past it: RESOURCE_EXHAUSTED
  #   max_batch_tokens: 8192    # sum of B*L per batch
  # }
}

layers {
  name: "base"
  embed_dim: 768
  num_heads: 12
  seed: 2
  # To serve trained weights instead (a PyTorch nn.MultiheadAttention state_dict):
  # weights_path: "/models/encoder.safetensors"
  # weights_prefix: "encoder.layers.0.self_attn."
}
)pb";

bool HasSuffix(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Collects TextFormat errors as "PATH:LINE:COL: message" (the tokenizer counts from 0; editors from 1).
class PrefixedErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  explicit PrefixedErrorCollector(std::string path) : path_(std::move(path)) {}

  void AddError(int line, google::protobuf::io::ColumnNumber column, const std::string& message) override {
    errors_.push_back(absl::StrCat(path_, ":", line + 1, ":", column + 1, ": ", message));
  }
  // Warnings (e.g. deprecated fields) do not fail the load; nothing in the schema triggers them today.
  void AddWarning(int, google::protobuf::io::ColumnNumber, const std::string&) override {}

  const std::vector<std::string>& errors() const { return errors_; }

 private:
  std::string path_;
  std::vector<std::string> errors_;
};

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat("config file \"", path, "\" not found"));
    return absl::ErrnoToStatus(err, absl::StrCat("cannot open config file \"", path, "\""));
  }
  std::string contents;
  char buf[1 << 14];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) contents.append(buf, n);
  // fopen succeeds on a directory; the read then fails with EISDIR.
  const bool failed = std::ferror(f) != 0;
  const int err = errno;
  std::fclose(f);
  if (failed) return absl::ErrnoToStatus(err, absl::StrCat("cannot read config file \"", path, "\""));
  return contents;
}

absl::StatusOr<ServerConfig> ParseTextConfig(const std::string& text, const std::string& path) {
  ServerConfig config;
  PrefixedErrorCollector errors(path);
  google::protobuf::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);  // instead of logging them to stderr
  if (!parser.ParseFromString(text, &config)) {
    if (errors.errors().empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": invalid text proto"));
    return absl::InvalidArgumentError(absl::StrJoin(errors.errors(), "; "));
  }
  return config;
}

absl::StatusOr<ServerConfig> ParseJsonConfig(const std::string& text, const std::string& path) {
  ServerConfig config;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;  // a misspelt field must not be silently ignored
  const auto status = google::protobuf::util::JsonStringToMessage(text, &config, options);
  if (!status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": invalid JSON config: ", std::string(status.message())));
  }
  return config;
}

struct HostPort {
  std::string host;
  int port = 0;
};

bool IsHostNameChar(char c) { return absl::ascii_isalnum(c) || c == '.' || c == '-' || c == '_'; }
bool IsIpv6Char(char c) { return absl::ascii_isxdigit(c) || c == ':' || c == '.' || c == '%'; }

absl::StatusOr<HostPort> ParseHostPort(const std::string& address) {
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("must be host:port (e.g. \"0.0.0.0:50051\", \"[::]:50051\", \"localhost:1234\"), got \"",
                     address, "\": ", why));
  };
  HostPort hp;
  std::string port;
  if (!address.empty() && address[0] == '[') {
    const size_t close = address.find(']');
    if (close == std::string::npos) return bad("missing ']' after the IPv6 address");
    hp.host = address.substr(1, close - 1);
    if (hp.host.empty()) return bad("empty IPv6 address");
    for (char c : hp.host) {
      if (!IsIpv6Char(c)) return bad("invalid character in the IPv6 address");
    }
    if (close + 1 >= address.size() || address[close + 1] != ':') return bad("missing ':port'");
    port = address.substr(close + 2);
  } else {
    const size_t colon = address.rfind(':');
    if (colon == std::string::npos) return bad("missing ':port'");
    hp.host = address.substr(0, colon);
    if (hp.host.empty()) return bad("empty host");
    for (char c : hp.host) {
      // A ':' here is an unbracketed IPv6 address, whose port would be ambiguous.
      if (!IsHostNameChar(c)) return bad("invalid character in the host (IPv6 addresses need [brackets])");
    }
    port = address.substr(colon + 1);
  }
  if (port.empty()) return bad("empty port");
  for (char c : port) {
    if (!absl::ascii_isdigit(c)) return bad("the port must be a decimal number");
  }
  if (port.size() > 5 || !absl::SimpleAtoi(port, &hp.port) || hp.port > 65535) {
    return bad("the port must be between 0 and 65535");
  }
  return hp;
}

bool IsWildcardHost(const std::string& host) { return host == "0.0.0.0" || host == "::" || host == "*"; }

bool IsValidLayerName(const std::string& name) {
  if (name.empty() || name.size() > kMaxLayerNameBytes) return false;
  for (char c : name) {
    if (!IsHostNameChar(c)) return false;  // same alphabet: [A-Za-z0-9_.-]
  }
  return true;
}

// Validation messages accumulate so an operator sees every problem of a config in one run.
class Problems {
 public:
  template <typename... Args>
  void Add(const Args&... args) {
    list_.push_back(absl::StrCat(args...));
  }
  size_t size() const { return list_.size(); }
  absl::Status ToStatus() const {
    if (list_.empty()) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrJoin(list_, "; "));
  }

 private:
  std::vector<std::string> list_;
};

// A decoder layer's zero fields as ToDecoderConfig reads them, so that GetLayer and ModelConfig show them.
void ApplyDecoderDefaults(LayerConfig* layer) {
  attnserve::v1::DecoderAttentionConfig* d = layer->mutable_decoder();
  if (layer->num_heads() <= 0) return;  // reported by validation; nothing to derive from
  if (d->num_kv_heads() == 0) d->set_num_kv_heads(layer->num_heads());
  if (d->head_dim() == 0 && layer->embed_dim() > 0 && layer->embed_dim() % layer->num_heads() == 0) {
    d->set_head_dim(layer->embed_dim() / layer->num_heads());
  }
  if (d->rope().theta() == 0) d->mutable_rope()->set_theta(10000);
  if (d->rope().rotary_dim() == 0) d->mutable_rope()->set_rotary_dim(d->head_dim());
}

void ApplyLayerDefaults(LayerConfig* layer) {
  if (layer->kind() == LayerConfig::DECODER_ATTENTION) {
    ApplyDecoderDefaults(layer);
  } else if (!layer->has_bias()) {
    layer->set_bias(true);
  }
  // Copying a non-positive embed_dim would only add a second, confusing error for the same mistake.
  if (layer->embed_dim() > 0 && layer->kind() != LayerConfig::DECODER_ATTENTION) {
    if (layer->kdim() == 0) layer->set_kdim(layer->embed_dim());
    if (layer->vdim() == 0) layer->set_vdim(layer->embed_dim());
  }
  if (layer->max_sequence_length() == 0) layer->set_max_sequence_length(kDefaultMaxSequenceLength);
  if (layer->max_batch() == 0) layer->set_max_batch(kDefaultMaxBatch);
  if (layer->max_tokens() == 0) layer->set_max_tokens(kDefaultMaxTokens);
  if (layer->max_response_bytes() == 0) layer->set_max_response_bytes(kDefaultMaxResponseBytes);
  if (layer->max_versions() == 0) layer->set_max_versions(1);
  BatchingConfig* b = layer->mutable_batching();
  const BatchingOptions defaults;
  if (b->max_batch_size() == 0) b->set_max_batch_size(defaults.max_batch_size);
  if (b->max_queue_size() == 0) b->set_max_queue_size(defaults.max_queue_size);
  if (b->max_batch_tokens() == 0) b->set_max_batch_tokens(defaults.max_batch_tokens);
}

// What one request may cost: checked here so that no limit can let an answer reach gRPC's send limit.
void ValidateRequestLimits(const LayerConfig& layer, const std::string& p, Problems* problems) {
  if (layer.max_batch() < 0) problems->Add(p, ".max_batch: must be >= 0, got ", layer.max_batch());
  if (layer.max_tokens() < 0) problems->Add(p, ".max_tokens: must be >= 0, got ", layer.max_tokens());
  if (layer.max_response_bytes() < 0 || layer.max_response_bytes() > kMaxResponseBytesLimit) {
    problems->Add(p, ".max_response_bytes: must be between 0 and ", kMaxResponseBytesLimit,
                  " (the gRPC message limit less framing), got ", layer.max_response_bytes());
  }
}

// kdim and vdim not negative; embed_dim, kdim and vdim within kMaxLayerDim (a dimension's weights are
// dim x dim floats: past the bound they overflow or cannot be allocated).
void ValidateKvDims(const LayerConfig& layer, const std::string& p, Problems* problems) {
  if (layer.kdim() < 0) problems->Add(p, ".kdim: must be >= 0 (0 = embed_dim), got ", layer.kdim());
  if (layer.vdim() < 0) problems->Add(p, ".vdim: must be >= 0 (0 = embed_dim), got ", layer.vdim());
  for (const auto& [field, dim] : {std::pair<const char*, int64_t>{"embed_dim", layer.embed_dim()},
                                   {"kdim", layer.kdim()}, {"vdim", layer.vdim()}}) {
    if (dim > kMaxLayerDim) problems->Add(p, ".", field, ": must be at most ", kMaxLayerDim, ", got ", dim);
  }
}

bool IsDecoder(const LayerConfig& layer) { return layer.kind() == LayerConfig::DECODER_ATTENTION; }

// The fields of the other kind are refused rather than ignored: a config that sets them describes a
// different layer than the one it would get. The decoder's own rules are DecoderConfig::Validate's (the
// backstop below), after the bounds that keep its weights allocatable.
void ValidateLayerKind(const LayerConfig& layer, const std::string& p, Problems* problems) {
  if (!IsDecoder(layer)) {
    if (layer.has_decoder()) problems->Add(p, ".decoder: set, but kind is MULTIHEAD_ATTENTION");
    return;
  }
  if (layer.kdim() != 0 || layer.vdim() != 0 || layer.has_bias()) {
    problems->Add(p, ".", layer.kdim() != 0 ? "kdim" : layer.vdim() != 0 ? "vdim" : "bias",
                  ": not used by DECODER_ATTENTION layers (self-attention; biases are decoder.qkv_bias and "
                  "decoder.o_bias)");
  }
  const auto& d = layer.decoder();
  if (d.head_dim() < 0 || d.head_dim() > kMaxLayerDim) {
    problems->Add(p, ".decoder.head_dim: must be in [0, ", kMaxLayerDim, "] (0 = embed_dim / num_heads), got ",
                  d.head_dim());
  }
  if (d.num_kv_heads() < 0) {
    problems->Add(p, ".decoder.num_kv_heads: must be >= 0 (0 = num_heads), got ", d.num_kv_heads());
  }
  const double width = static_cast<double>(layer.num_heads()) * static_cast<double>(d.head_dim());
  if (width > static_cast<double>(kMaxLayerDim)) {
    problems->Add(p, ".decoder.head_dim: num_heads * head_dim is ", width, ", past ", kMaxLayerDim);
  }
}

// embed_dim > 0, num_heads > 0 dividing it (unless a decoder layer sets its own head_dim).
void ValidateHeads(const LayerConfig& layer, const std::string& p, Problems* problems) {
  const bool embed_ok = layer.embed_dim() > 0;
  if (!embed_ok) problems->Add(p, ".embed_dim: must be > 0, got ", layer.embed_dim());
  if (layer.num_heads() <= 0) {
    problems->Add(p, ".num_heads: must be > 0, got ", layer.num_heads());
  } else if (embed_ok && layer.embed_dim() % layer.num_heads() != 0 &&
             (!IsDecoder(layer) || layer.decoder().head_dim() == 0)) {
    problems->Add(p, ".num_heads: ", layer.num_heads(), " does not divide embed_dim ", layer.embed_dim(),
                  IsDecoder(layer) ? " (set decoder.head_dim)" : "");
  }
}

void ValidateLayer(const LayerConfig& layer, const std::string& p, Problems* problems) {
  const size_t problems_before = problems->size();
  if (!IsValidLayerName(layer.name())) {
    problems->Add(p, ".name: must match [A-Za-z0-9_.-]{1,", kMaxLayerNameBytes, "}, got \"",
                  BoundedForLog(layer.name()), "\"");
  }
  ValidateHeads(layer, p, problems);
  ValidateKvDims(layer, p, problems);
  ValidateLayerKind(layer, p, problems);

  if (!layer.weights_path().empty()) {
    std::error_code ec;
    const auto status = std::filesystem::status(layer.weights_path(), ec);
    if (!std::filesystem::exists(status)) {
      problems->Add(p, ".weights_path: file \"", layer.weights_path(), "\" not found");
    } else if (!std::filesystem::is_regular_file(status)) {
      problems->Add(p, ".weights_path: \"", layer.weights_path(), "\" is not a regular file");
    }
  } else if (!layer.weights_prefix().empty()) {
    // Random weights ignore the prefix; the author most likely forgot weights_path.
    problems->Add(p, ".weights_prefix: set to \"", layer.weights_prefix(), "\" but weights_path is empty");
  }

  if (layer.max_sequence_length() < 0) {
    problems->Add(p, ".max_sequence_length: must be >= 0 (0 = ", kDefaultMaxSequenceLength, "), got ",
                  layer.max_sequence_length());
  } else if (layer.max_sequence_length() > kMaxSequenceLengthLimit) {
    problems->Add(p, ".max_sequence_length: must be <= ", kMaxSequenceLengthLimit, ", got ",
                  layer.max_sequence_length());
  }

  ValidateRequestLimits(layer, p, problems);
  if (!LayerConfig::ComputeDtype_IsValid(layer.compute_dtype())) {
    problems->Add(p, ".compute_dtype: must be FLOAT32 or BFLOAT16, got ", layer.compute_dtype());
  }
  if (layer.max_versions() < 0 || layer.max_versions() > kMaxVersionsLimit) {
    problems->Add(p, ".max_versions: must be in [0, ", kMaxVersionsLimit, "] (0 = 1), got ", layer.max_versions());
  }

  const BatchingConfig& b = layer.batching();
  const std::string bp = p + ".batching";
  if (b.max_batch_size() < 0) problems->Add(bp, ".max_batch_size: must be >= 0, got ", b.max_batch_size());
  if (b.max_queue_delay_us() < 0) {
    problems->Add(bp, ".max_queue_delay_us: must be >= 0, got ", b.max_queue_delay_us());
  }
  if (b.max_queue_size() < 0) problems->Add(bp, ".max_queue_size: must be >= 0, got ", b.max_queue_size());
  if (b.max_batch_tokens() < 0) problems->Add(bp, ".max_batch_tokens: must be >= 0, got ", b.max_batch_tokens());
  if (b.max_batch_size() > 0 && b.max_queue_size() > 0 && b.max_batch_size() > b.max_queue_size()) {
    // A batch is drawn from the queue, so it could never fill up.
    problems->Add(bp, ".max_batch_size: ", b.max_batch_size(), " exceeds max_queue_size ", b.max_queue_size());
  }

  // Backstop: the engine's own rules, should they ever be stricter than the checks above.
  if (problems->size() == problems_before) {
    const absl::Status status = IsDecoder(layer) ? ToDecoderConfig(layer).Validate() : ToMhaConfig(layer).Validate();
    // The decoder's messages start with the field they name.
    if (!status.ok()) problems->Add(p, IsDecoder(layer) ? "." : ": ", std::string(status.message()));
  }
}

}  // namespace

ServerConfig DefaultServerConfig() {
  absl::StatusOr<ServerConfig> config = ParseTextConfig(kDefaultServerConfigPbtxt, "<embedded default config>");
  if (!config.ok()) {
    // A broken embedded constant is a build defect that tests catch; nothing sensible to serve instead.
    std::fprintf(stderr, "attnserve: %s\n", config.status().ToString().c_str());
    std::abort();
  }
  return *std::move(config);
}

absl::StatusOr<ServerConfig> LoadServerConfigFile(const std::string& path) {
  // Decide the format before touching the file, so a wrong extension is reported as such.
  const std::string lower = absl::AsciiStrToLower(path);
  const bool is_text = HasSuffix(lower, ".pbtxt") || HasSuffix(lower, ".textproto") || HasSuffix(lower, ".txtpb");
  const bool is_json = HasSuffix(lower, ".json");
  if (!is_text && !is_json) {
    return absl::InvalidArgumentError(absl::StrCat("config file \"", path,
                                                   "\": unknown extension; expected .pbtxt, .textproto, .txtpb "
                                                   "(protobuf text format) or .json"));
  }
  ATTN_ASSIGN_OR_RETURN(const std::string text, ReadFile(path));
  return is_json ? ParseJsonConfig(text, path) : ParseTextConfig(text, path);
}

absl::Status CheckHostPort(const std::string& address) { return ParseHostPort(address).status(); }

namespace {

void CheckSessions(const attnserve::v1::SessionsConfig& sessions, Problems* problems) {
  for (const auto& [name, value] : {std::pair<const char*, int64_t>{"kv_cache_bytes", sessions.kv_cache_bytes()},
                                    {"kv_block_tokens", sessions.kv_block_tokens()},
                                    {"idle_timeout_ms", sessions.idle_timeout_ms()},
                                    {"max_sessions", sessions.max_sessions()},
                                    {"max_queued_appends", sessions.max_queued_appends()},
                                    {"prefill_chunk_tokens", sessions.prefill_chunk_tokens()},
                                    {"max_opens_waiting", sessions.max_opens_waiting()}}) {
    if (value < 0) problems->Add("sessions.", name, ": must be >= 0 (0 = the default), got ", value);
  }
  if (sessions.kv_block_tokens() > 4096) {
    problems->Add("sessions.kv_block_tokens: must be <= 4096, got ", sessions.kv_block_tokens());
  }
}

}  // namespace

absl::Status ApplyDefaultsAndValidate(ServerConfig* config) {
  if (config->grpc_address().empty()) config->set_grpc_address(kDefaultGrpcAddress);
  if (config->metrics_address().empty()) config->set_metrics_address(kDefaultMetricsAddress);
  if (config->max_inflight_per_stream() == 0) config->set_max_inflight_per_stream(kDefaultMaxInflightPerStream);
  for (LayerConfig& layer : *config->mutable_layers()) ApplyLayerDefaults(&layer);
  ApplySecurityAndTransportDefaults(config);

  Problems problems;
  for (const std::string& problem : SecurityAndTransportProblems(*config)) problems.Add(problem);
  const absl::StatusOr<HostPort> grpc = ParseHostPort(config->grpc_address());
  if (!grpc.ok()) problems.Add("grpc_address: ", grpc.status().message());
  const absl::StatusOr<HostPort> metrics = ParseHostPort(config->metrics_address());
  if (!metrics.ok()) problems.Add("metrics_address: ", metrics.status().message());
  if (grpc.ok() && metrics.ok() && grpc->port != 0 && grpc->port == metrics->port &&
      (grpc->host == metrics->host || IsWildcardHost(grpc->host) || IsWildcardHost(metrics->host))) {
    problems.Add("metrics_address: \"", config->metrics_address(), "\" conflicts with grpc_address \"",
                 config->grpc_address(), "\"");
  }
  if (!config->health_address().empty()) {
    const absl::StatusOr<HostPort> health = ParseHostPort(config->health_address());
    if (!health.ok()) problems.Add("health_address: ", health.status().message());
  }
  if (config->worker_threads() < 0 || config->worker_threads() > kMaxWorkerThreads) {
    problems.Add("worker_threads: must be between 0 (one per CPU) and ", kMaxWorkerThreads, ", got ",
                 config->worker_threads());
  }

  CheckSessions(config->sessions(), &problems);
  if (config->memory_budget_bytes() < 0) {
    problems.Add("memory_budget_bytes: must be >= 0 (0 = half the memory limit), got ",
                 config->memory_budget_bytes());
  }
  if (config->max_inflight_per_stream() < 0) {
    problems.Add("max_inflight_per_stream: must be >= 0 (0 = ", kDefaultMaxInflightPerStream, "), got ",
                 config->max_inflight_per_stream());
  }
  if (config->layers().empty()) problems.Add("layers: at least one layer is required");
  absl::flat_hash_map<std::string, int> first_index;
  for (int i = 0; i < config->layers_size(); ++i) {
    const LayerConfig& layer = config->layers(i);
    const std::string p = absl::StrCat("layers[", i, "]");
    ValidateLayer(layer, p, &problems);
    if (layer.name().empty()) continue;  // already reported
    const auto [it, inserted] = first_index.emplace(layer.name(), i);
    if (!inserted) {
      problems.Add(p, ".name: duplicate \"", layer.name(), "\", already used by layers[", it->second, "]");
    }
  }
  return problems.ToStatus();
}

}  // namespace attnserve

namespace attnserve {

absl::Status ApplyLayerDefaultsAndValidate(LayerConfig* layer) {
  ApplyLayerDefaults(layer);
  Problems problems;
  ValidateLayer(*layer, "layer", &problems);
  return problems.ToStatus();
}

}  // namespace attnserve
