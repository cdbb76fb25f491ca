// attnctl: a command-line client of attnserve for people and scripts. See Usage() for commands, flags and
// exit codes.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <google/protobuf/text_format.h>
#include <google/protobuf/util/json_util.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/command_line.h"
#include "client/client.h"
#include "client/grpc_status.h"
#include "tools/attnctl_models.h"
#include "tools/npy.h"
#include "tools/tensor_summary.h"
#include "common/status_macros.h"

namespace attnserve {
namespace {

// Exit codes, documented in Usage().
enum Exit : int {
  kOk = 0,
  kUsage = 1,
  kUnreachable = 2,
  kNotFound = 3,
  kInvalidArgument = 4,
  kOtherError = 5,
};

constexpr char kDefaultTarget[] = "127.0.0.1:50051";

constexpr FlagSpec kFlags[] = {
    {"help", false},       {"target", true, "ATTNSERVE_TARGET"}, {"tls", false},   {"tls-root-certs", true},
    {"timeout-ms", true},  {"json", false},         {"service", true},       {"batch", true},
    {"seq", true},         {"kv-seq", true},        {"causal", false},       {"need-weights", false},
    {"per-head-weights", false}, {"seed", true},    {"query", true},         {"key", true},
    {"value", true},       {"key-padding-mask", true}, {"attn-mask", true},  {"output", true},
    {"weights-output", true}, {"tls-cert", true}, {"tls-key", true}, {"token-file", true}, {"traceparent", true},
    {"config-json", true}, {"position-offset", true},
};
// Flags only `infer` takes; given to another command they are a usage error rather than silently ignored.
constexpr const char* kInferFlags[] = {"batch", "seq", "kv-seq", "causal", "need-weights", "per-head-weights",
                                       "seed", "query", "key", "value", "key-padding-mask", "attn-mask",
                                       "output", "weights-output", "position-offset"};

std::string Usage() {
  return absl::StrCat(R"(Usage: attnctl [flags] COMMAND [ARGS]

Commands:
  health                 the server's health (grpc.health.v1); --service NAME for one service
  list                   the layers the server holds
  describe LAYER         one layer's configuration
  infer LAYER            one attention forward pass; prints the output's shape and statistics
  versions               every layer the server knows: version, state (READY, LOADING, UNAVAILABLE), reason
  load LAYER             load a configured layer, or a new one with --config-json FILE (a LayerConfig in JSON)
  reload LAYER           load a new version of a loaded layer (its weights file read again)
  unload LAYER           stop serving a layer once its queued requests are answered
                         (load, reload, unload: an admin token, or a server with --enable-model-control)

Flags:
  --target TARGET        gRPC target (default $ATTNSERVE_TARGET, else )", kDefaultTarget, R"();
                         several servers: ipv4:10.0.0.1:50051,10.0.0.2:50051 or dns:///name:50051
  --tls                  TLS instead of plaintext
  --tls-root-certs FILE  PEM root certificates for --tls (default: gRPC's)
  --tls-cert FILE        PEM client certificate for servers that require one (mTLS); with --tls-key
  --tls-key FILE         PEM private key of --tls-cert
  --token-file FILE      file whose first line is the token sent as "authorization: Bearer" (default:
                         $ATTNSERVE_TOKEN, else none)
  --traceparent TP       W3C traceparent sent with the call (00-<trace id>-<span id>-<flags>); errors end
                         in the server's [trace_id ...] either way
  --timeout-ms N         deadline of each call (default 10000; 0 = none)
  --json                 machine-readable output on stdout (errors too, as {"error": {...}})
  --help                 this text

load options:
  --config-json FILE     the layer's config (JSON, attnserve/v1/config.proto's LayerConfig); its name is LAYER

infer inputs: random normal values of a given shape (the layer's dims come from the server) ...
  --batch B              sequences (default 1)
  --seq L                query length (default 16)
  --kv-seq S             separate random key and value of length S (default: self-attention)
  --seed N               seed of the random values (default 1)
... or .npy files (little-endian float32, C order; masks bool or float32):
  --query FILE           [B, L, E] or [L, E]
  --key FILE --value FILE   [B, S, kdim] and [B, S, vdim] (both or neither)
  --key-padding-mask FILE   [B, S]: bool true = ignore that key, or float32 added to the scores
  --attn-mask FILE       [L, S] or [B*H, L, S]: bool true = may not attend, or float32 added
infer options:
  --causal               query i attends only keys j <= i
  --need-weights         also return the attention weights (averaged over heads)
  --per-head-weights     with --need-weights: one set per head instead of the average
  --output FILE          save the output as .npy
  --weights-output FILE  save the attention weights as .npy (needs --need-weights)
  --position-offset N    DECODER_ATTENTION layers: rotary position of the first token (default 0)

Exit status:
  0  success (health: SERVING)
  1  usage error: bad flags or arguments, an unreadable or unsupported .npy file
  2  server unreachable: nothing answers at --target (UNAVAILABLE) or it timed out (DEADLINE_EXCEEDED)
  3  not found: no such layer (or health service) on the server
  4  invalid argument: the server refused the request, e.g. a bad shape; its message says which field
  5  any other failure (health not SERVING, server errors, an output file that cannot be written)
)");
}

int UsageError(const std::string& message) {
  std::fprintf(stderr, "attnctl: %s\n(see attnctl --help)\n", message.c_str());
  return kUsage;
}

struct Context {
  const Client* client = nullptr;
  std::string target;
  int64_t timeout_ms = 0;
  bool json = false;
};

// Reports a failed call on stderr (and on stdout as JSON with --json) and returns its exit code.
int CallFailed(const Context& ctx, const absl::Status& status, const std::string& hint_not_found) {
  const std::string code = StatusCodeName(static_cast<int>(status.code()));
  const std::string message(status.message());
  int exit_code = kOtherError;
  std::string hint;
  switch (status.code()) {
    case absl::StatusCode::kUnavailable:
      exit_code = kUnreachable;
      hint = absl::StrCat("cannot reach attnserve at ", ctx.target,
                          ": is the server running, and is --target (or $ATTNSERVE_TARGET) right?");
      break;
    case absl::StatusCode::kDeadlineExceeded:
      exit_code = kUnreachable;
      hint = absl::StrCat("no answer from ", ctx.target, " within --timeout-ms ", ctx.timeout_ms,
                          ": the server is unreachable or overloaded (large requests may need a longer timeout)");
      break;
    case absl::StatusCode::kNotFound:
      exit_code = kNotFound;
      hint = hint_not_found;
      break;
    case absl::StatusCode::kInvalidArgument:
      exit_code = kInvalidArgument;
      hint = "the server refused the request; the message above names the field";
      break;
    default:
      break;
  }
  std::fprintf(stderr, "attnctl: %s: %s\n", code.c_str(), message.c_str());
  if (!hint.empty()) std::fprintf(stderr, "attnctl: %s\n", hint.c_str());
  if (ctx.json) {
    nlohmann::json j = {{"error", {{"code", code}, {"message", message}, {"exit_code", exit_code}}}};
    std::printf("%s\n", j.dump(2).c_str());
  }
  return exit_code;
}

std::string ToJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string out;
  (void)google::protobuf::util::MessageToJsonString(message, &out, options);
  return out;
}

int Health(const Context& ctx, const CommandLine& cl) {
  const std::string service = cl.Get("service").value_or("");
  auto status = ctx.client->Health(service);
  if (!status.ok()) {
    return CallFailed(ctx, status.status(), absl::StrCat("the server has no health service \"", service, "\""));
  }
  const char* name = Client::HealthStatusName(*status);
  if (ctx.json) {
    std::printf("%s\n", nlohmann::json({{"service", service}, {"status", name}}).dump(2).c_str());
  } else {
    std::printf("%s\n", name);
  }
  return *status == Client::HealthStatus::kServing ? kOk : kOtherError;
}

int List(const Context& ctx) {
  auto layers = ctx.client->ListLayers();
  if (!layers.ok()) return CallFailed(ctx, layers.status(), "");
  if (ctx.json) {
    attnserve::v1::ListLayersResponse response;
    for (const auto& l : *layers) *response.add_layers() = l;
    std::printf("%s", ToJson(response).c_str());
    return kOk;
  }
  std::printf("%-20s %6s %6s %6s %6s %8s %9s %6s\n", "NAME", "EMBED", "HEADS", "KDIM", "VDIM", "MAX_SEQ",
              "MAX_BATCH", "READY");
  for (const auto& l : *layers) {
    const auto& c = l.config();
    std::printf("%-20s %6lld %6lld %6lld %6lld %8lld %9d %6s\n", c.name().c_str(),
                static_cast<long long>(c.embed_dim()), static_cast<long long>(c.num_heads()),
                static_cast<long long>(c.kdim() > 0 ? c.kdim() : c.embed_dim()),
                static_cast<long long>(c.vdim() > 0 ? c.vdim() : c.embed_dim()),
                static_cast<long long>(c.max_sequence_length()), c.batching().max_batch_size(),
                l.ready() ? "yes" : "no");
  }
  return kOk;
}

std::string NotFoundHint(const std::string& layer) {
  return absl::StrCat("no layer \"", layer, "\" on the server; `attnctl list` shows the layers it has");
}

int Describe(const Context& ctx, const std::string& name) {
  auto layer = ctx.client->GetLayer(name);
  if (!layer.ok()) return CallFailed(ctx, layer.status(), NotFoundHint(name));
  if (ctx.json) {
    std::printf("%s", ToJson(*layer).c_str());
  } else {
    std::string text;
    google::protobuf::TextFormat::PrintToString(*layer, &text);
    std::printf("%s", text.c_str());
  }
  return kOk;
}

std::vector<float> RandomValues(int64_t n, std::mt19937_64* rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = normal(*rng);
  return v;
}

// An .npy input, or a usage error naming the flag.
absl::StatusOr<NpyArray> ReadInput(const CommandLine& cl, const std::string& flag, bool float_only) {
  auto array = ReadNpy(*cl.Get(flag));
  if (!array.ok()) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", array.status().message()));
  if (float_only && array->dtype != NpyArray::DType::kFloat32) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, ": ", *cl.Get(flag), " holds bool values; float32 needed"));
  }
  return array;
}

Client::MaskInput MaskOf(const NpyArray& a) {
  return a.dtype == NpyArray::DType::kBool ? Client::MaskInput::Bool(a.bools, a.shape)
                                           : Client::MaskInput::Float(a.floats, a.shape);
}

nlohmann::json SummaryJson(const Client::Tensor& t) {
  const ValueSummary s = SummarizeValues(t.values);
  return {{"shape", t.shape}, {"count", s.count}, {"mean", s.mean}, {"std", s.std}, {"min", s.min},
          {"max", s.max},     {"nan", s.nan_count}, {"inf", s.inf_count}};
}

std::string SummaryText(const char* name, const Client::Tensor& t) {
  const ValueSummary s = SummarizeValues(t.values);
  std::string out = absl::StrFormat("%s: shape [%s] float32\n  mean %.6g  std %.6g  min %.6g  max %.6g", name,
                                    absl::StrJoin(t.shape, ", "), s.mean, s.std, s.min, s.max);
  if (s.nan_count > 0 || s.inf_count > 0) absl::StrAppendFormat(&out, "  nan %d  inf %d", s.nan_count, s.inf_count);
  return out + "\n";
}

struct InferFlags {
  int64_t batch = 1, seq = 16, kv_seq = 0, seed = 1, position_offset = 0;
};

// The numeric flags and the flag combinations infer refuses (InvalidArgument: a usage error).
absl::StatusOr<InferFlags> ParseInferFlags(const CommandLine& cl) {
  InferFlags f;
  for (const auto& [flag, out, min] : {std::tuple<const char*, int64_t*, int64_t>{"batch", &f.batch, 1},
                                       {"seq", &f.seq, 0}, {"kv-seq", &f.kv_seq, 0}, {"seed", &f.seed, 0},
                                       {"position-offset", &f.position_offset, 0}}) {
    if (auto v = cl.Get(flag)) {
      ATTN_ASSIGN_OR_RETURN(*out, ParseIntFlag(flag, *v, min, int64_t{1} << 40));
    }
  }
  auto usage = [](const char* message) { return absl::InvalidArgumentError(message); };
  if (cl.Has("query") && (cl.Has("batch") || cl.Has("seq") || cl.Has("seed"))) {
    return usage("--query takes its shape from the file: drop --batch, --seq and --seed");
  }
  if (cl.Has("key") != cl.Has("value")) return usage("--key and --value come together");
  if (cl.Has("key") && cl.Has("kv-seq")) return usage("--kv-seq makes random key/value: drop it with --key");
  if (cl.Has("weights-output") && !cl.Has("need-weights")) return usage("--weights-output needs --need-weights");
  if (cl.Has("per-head-weights") && !cl.Has("need-weights")) return usage("--per-head-weights needs --need-weights");
  return f;
}

struct InferArrays {
  NpyArray query, key, value, key_padding_mask, attn_mask;
};

// The .npy files the flags name (InvalidArgument: a usage error).
absl::Status ReadInferFiles(const CommandLine& cl, InferArrays* in) {
  struct FileInput {
    const char* flag;
    NpyArray* array;
    bool float_only;
  };
  for (const FileInput& f : {FileInput{"query", &in->query, true}, FileInput{"key", &in->key, true},
                             FileInput{"value", &in->value, true},
                             FileInput{"key-padding-mask", &in->key_padding_mask, false},
                             FileInput{"attn-mask", &in->attn_mask, false}}) {
    if (!cl.Has(f.flag)) continue;
    ATTN_ASSIGN_OR_RETURN(*f.array, ReadInput(cl, f.flag, f.float_only));
  }
  return absl::OkStatus();
}

// Random query (unless read from a file) and key/value (--kv-seq), shaped by the layer's dims `c`.
void RandomInferInputs(const attnserve::v1::LayerConfig& c, const InferFlags& f, bool query_from_file,
                       InferArrays* in) {
  std::mt19937_64 rng(static_cast<uint64_t>(f.seed));
  if (!query_from_file) {
    in->query.shape = {f.batch, f.seq, c.embed_dim()};
    in->query.floats = RandomValues(f.batch * f.seq * c.embed_dim(), &rng);
  }
  if (f.kv_seq <= 0) return;
  const int64_t b = in->query.shape.size() == 3 ? in->query.shape[0] : 1;
  const int64_t kdim = c.kdim() > 0 ? c.kdim() : c.embed_dim();
  const int64_t vdim = c.vdim() > 0 ? c.vdim() : c.embed_dim();
  in->key.shape = {b, f.kv_seq, kdim};
  in->key.floats = RandomValues(b * f.kv_seq * kdim, &rng);
  in->value.shape = {b, f.kv_seq, vdim};
  in->value.floats = RandomValues(b * f.kv_seq * vdim, &rng);
  if (in->query.shape.size() == 2) {  // unbatched query: unbatched key and value too
    in->key.shape.erase(in->key.shape.begin());
    in->value.shape.erase(in->value.shape.begin());
  }
}

Client::InferOptions InferOptionsOf(const CommandLine& cl, const InferArrays& in, int64_t position_offset) {
  Client::InferOptions options;
  if (!in.key.shape.empty()) {
    options.key = {in.key.floats, in.key.shape};
    options.value = {in.value.floats, in.value.shape};
  }
  if (cl.Has("key-padding-mask")) options.key_padding_mask = MaskOf(in.key_padding_mask);
  if (cl.Has("attn-mask")) options.attn_mask = MaskOf(in.attn_mask);
  options.is_causal = cl.Has("causal");
  options.need_weights = cl.Has("need-weights");
  options.average_attn_weights = !cl.Has("per-head-weights");
  options.position_offset = position_offset;
  return options;
}

// Saves what --output / --weights-output ask for and prints the answer's summary.
int ReportInfer(const Context& ctx, const std::string& layer, const CommandLine& cl, const Client::InferResult& result,
                bool need_weights, double round_trip_ms) {
  for (const auto& [flag, tensor] : {std::pair<const char*, const Client::Tensor*>{"output", &result.output},
                                     {"weights-output", &result.attn_weights}}) {
    if (auto path = cl.Get(flag)) {
      if (absl::Status s = WriteNpyFloat32(*path, tensor->values, tensor->shape); !s.ok()) {
        std::fprintf(stderr, "attnctl: --%s: %s\n", flag, std::string(s.message()).c_str());
        return kOtherError;
      }
    }
  }
  const Client::Timing& t = result.timing;
  if (ctx.json) {
    nlohmann::json j = {
        {"layer", layer},
        {"output", SummaryJson(result.output)},
        {"timing", {{"queue_us", t.queue_us}, {"compute_us", t.compute_us}, {"batch_size", t.batch_size}}},
        {"round_trip_ms", round_trip_ms}};
    if (need_weights) j["attn_weights"] = SummaryJson(result.attn_weights);
    if (auto path = cl.Get("output")) j["output_path"] = *path;
    if (auto path = cl.Get("weights-output")) j["weights_output_path"] = *path;
    std::printf("%s\n", j.dump(2).c_str());
    return kOk;
  }
  std::printf("%s", SummaryText("output", result.output).c_str());
  if (need_weights) std::printf("%s", SummaryText("attn_weights", result.attn_weights).c_str());
  std::printf("timing: queue %lld us, compute %lld us, batch of %d; round trip %.2f ms\n",
              static_cast<long long>(t.queue_us), static_cast<long long>(t.compute_us), t.batch_size, round_trip_ms);
  for (const char* flag : {"output", "weights-output"}) {
    if (auto path = cl.Get(flag)) std::printf("saved %s\n", path->c_str());
  }
  return kOk;
}

int Infer(const Context& ctx, const std::string& layer, const CommandLine& cl) {
  // Flags and files first, so usage errors come before any call.
  const absl::StatusOr<InferFlags> flags = ParseInferFlags(cl);
  if (!flags.ok()) return UsageError(std::string(flags.status().message()));
  InferArrays in;
  if (absl::Status s = ReadInferFiles(cl, &in); !s.ok()) return UsageError(std::string(s.message()));
  const bool from_file = cl.Has("query");
  if (!from_file || flags->kv_seq > 0) {  // random values shaped by the layer's dims: ask the server
    auto info = ctx.client->GetLayer(layer);
    if (!info.ok()) return CallFailed(ctx, info.status(), NotFoundHint(layer));
    RandomInferInputs(info->config(), *flags, from_file, &in);
  }
  const Client::InferOptions options = InferOptionsOf(cl, in, flags->position_offset);
  const auto start = std::chrono::steady_clock::now();
  auto result = ctx.client->Infer(layer, in.query.floats, in.query.shape, options);
  const double round_trip_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  if (!result.ok()) return CallFailed(ctx, result.status(), NotFoundHint(layer));
  return ReportInfer(ctx, layer, cl, *result, options.need_weights, round_trip_ms);
}

// versions, load, reload, unload.
int Models(const Context& ctx, const std::string& command, const std::string& layer, const CommandLine& cl) {
  if (command == "versions") {
    auto versions = ListModelVersions(*ctx.client, ctx.timeout_ms);
    if (!versions.ok()) return CallFailed(ctx, versions.status(), "");
    if (!ctx.json) std::printf("%-20s %8s %-12s %s\n", "NAME", "VERSION", "STATE", "REASON");
    nlohmann::json all = nlohmann::json::array();
    for (const auto& v : *versions) {
      if (!ctx.json) std::printf("%-20s %8s %-12s %s\n", v.name.c_str(), v.version.c_str(), v.state.c_str(),
                                 v.reason.c_str());
      all.push_back({{"name", v.name}, {"version", v.version}, {"state", v.state}, {"reason", v.reason}});
    }
    if (ctx.json) std::printf("%s\n", nlohmann::json{{"layers", all}}.dump(2).c_str());
    return kOk;
  }
  std::string config_json;
  if (auto path = cl.Get("config-json")) {
    std::ifstream in(*path);
    if (!in) return UsageError(absl::StrCat("--config-json: cannot read ", *path));
    config_json.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  const absl::Status status = command == "unload" ? UnloadModel(*ctx.client, layer, ctx.timeout_ms)
                                                  : LoadModel(*ctx.client, layer, config_json, ctx.timeout_ms);
  if (!status.ok()) return CallFailed(ctx, status, NotFoundHint(layer));
  if (ctx.json) {
    const nlohmann::json done = {{"layer", layer}, {command == "unload" ? "unloaded" : "loaded", true}};
    std::printf("%s\n", done.dump(2).c_str());
  } else {
    std::printf("%s %s\n", command == "unload" ? "unloaded" : "loaded", layer.c_str());
  }
  return kOk;
}

int Run(int argc, char** argv) {
  auto parsed = ParseCommandLine(std::vector<std::string>(argv + 1, argv + argc), kFlags, std::getenv);
  if (!parsed.ok()) return UsageError(std::string(parsed.status().message()));
  const CommandLine& cl = *parsed;
  if (cl.Has("help")) {
    std::fputs(Usage().c_str(), stdout);
    return kOk;
  }
  if (cl.positional.empty()) return UsageError("missing COMMAND (see --help)");
  const std::string command = cl.positional[0];
  const std::set<std::string> with_layer = {"describe", "infer", "load", "reload", "unload"};
  const std::set<std::string> without = {"health", "list", "versions"};
  if (with_layer.count(command) == 0 && without.count(command) == 0) {
    return UsageError(absl::StrCat("unknown command \"", command, "\" (see --help)"));
  }
  const size_t want_args = with_layer.count(command) > 0 ? 2 : 1;
  if (cl.positional.size() != want_args) {
    return UsageError(want_args == 2 ? absl::StrCat(command, " takes one LAYER argument")
                                     : absl::StrCat(command, " takes no arguments"));
  }
  for (const char* flag : kInferFlags) {
    if (command != "infer" && cl.Has(flag)) return UsageError(absl::StrCat("--", flag, " applies to infer only"));
  }
  if (command != "health" && cl.Has("service")) return UsageError("--service applies to health only");
  if (command != "load" && cl.Has("config-json")) return UsageError("--config-json applies to load only");

  Client::Options options;
  options.target = cl.Get("target").value_or(kDefaultTarget);
  options.use_tls = cl.Has("tls");
  options.tls_root_certs_path = cl.Get("tls-root-certs").value_or("");
  options.tls_cert_path = cl.Get("tls-cert").value_or("");
  options.tls_key_path = cl.Get("tls-key").value_or("");
  auto token = Client::TokenFromEnvironmentOrFile(cl.Get("token-file").value_or(""), std::getenv);
  if (!token.ok()) return UsageError(std::string(token.status().message()));
  options.token = *token;
  options.traceparent = cl.Get("traceparent").value_or("");
  options.default_timeout_ms = 10'000;
  if (auto v = cl.Get("timeout-ms")) {
    auto ms = ParseIntFlag("timeout-ms", *v, 0, 3'600'000);
    if (!ms.ok()) return UsageError(std::string(ms.status().message()));
    options.default_timeout_ms = *ms;
  }
  auto client = Client::Create(options);
  if (!client.ok()) return UsageError(std::string(client.status().message()));

  Context ctx{client->get(), options.target, options.default_timeout_ms, cl.Has("json")};
  if (command == "health") return Health(ctx, cl);
  if (command == "list") return List(ctx);
  if (command == "describe") return Describe(ctx, cl.positional[1]);
  if (command == "infer") return Infer(ctx, cl.positional[1], cl);
  return Models(ctx, command, want_args == 2 ? cl.positional[1] : "", cl);
}

}  // namespace
}  // namespace attnserve

int main(int argc, char** argv) { return attnserve::Run(argc, argv); }
