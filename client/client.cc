#include "client/client.h"

#include <chrono>
#include <climits>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

#include <grpcpp/generic/generic_stub.h>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "client/grpc_status.h"
#include "client/health_wire.h"
#include "common/status_macros.h"

// Tensors travel as little-endian raw_data; the bytes are copied as they are.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "attnserve::Client assumes a little-endian host");

namespace attnserve {
namespace {

using attnserve::v1::DataType;

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Element count of `shape`, or InvalidArgument naming `field` for a negative dimension.
absl::StatusOr<int64_t> CountElements(const std::vector<int64_t>& shape, const std::string& field) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": negative dimension in shape ", ShapeString(shape)));
    }
    n *= d;
  }
  return n;
}

template <typename T>
absl::Status EncodeValues(const std::string& field, absl::Span<const T> values, const std::vector<int64_t>& shape,
                          DataType dtype, attnserve::v1::Tensor* out) {
  ATTN_ASSIGN_OR_RETURN(const int64_t n, CountElements(shape, field));
  if (static_cast<int64_t>(values.size()) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": ", values.size(), " values given for shape ", ShapeString(shape), " (", n, ")"));
  }
  for (int64_t d : shape) out->add_shape(d);
  out->set_dtype(dtype);
  out->set_raw_data(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
  return absl::OkStatus();
}

absl::Status EncodeMask(const std::string& field, const Client::MaskInput& mask, attnserve::v1::Tensor* out) {
  return mask.is_bool ? EncodeValues(field, mask.bool_values, mask.shape, attnserve::v1::BOOL, out)
                      : EncodeValues(field, mask.float_values, mask.shape, attnserve::v1::FLOAT32, out);
}

absl::StatusOr<Client::Tensor> DecodeFloatTensor(const attnserve::v1::Tensor& t, const std::string& field) {
  Client::Tensor out;
  out.shape.assign(t.shape().begin(), t.shape().end());
  ATTN_ASSIGN_OR_RETURN(const int64_t n, CountElements(out.shape, field));
  if (t.float_data_size() > 0) {
    out.values.assign(t.float_data().begin(), t.float_data().end());
  } else {
    if (t.raw_data().size() % sizeof(float) != 0) {
      return absl::InternalError(absl::StrCat(field, ": raw_data of ", t.raw_data().size(), " bytes is not FLOAT32"));
    }
    out.values.resize(t.raw_data().size() / sizeof(float));
    if (!out.values.empty()) std::memcpy(out.values.data(), t.raw_data().data(), t.raw_data().size());
  }
  if (static_cast<int64_t>(out.values.size()) != n) {
    return absl::InternalError(absl::StrCat("server sent ", field, " with ", out.values.size(),
                                            " values for shape ", ShapeString(out.shape)));
  }
  return out;
}

absl::StatusOr<std::string> ReadTextFile(const char* field, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  if (!in || text.str().empty()) return absl::NotFoundError(absl::StrCat(field, ": cannot read \"", path, "\""));
  return text.str();
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeCredentials(const Client::Options& o) {
  if (!o.use_tls) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions ssl;
  if (!o.tls_root_certs_path.empty()) {
    std::ifstream in(o.tls_root_certs_path, std::ios::binary);
    std::stringstream pem;
    pem << in.rdbuf();
    if (!in || pem.str().empty()) {
      return absl::NotFoundError(absl::StrCat("tls_root_certs_path: cannot read \"", o.tls_root_certs_path, "\""));
    }
    ssl.pem_root_certs = pem.str();
  }
  if (!o.tls_cert_path.empty()) {
    ATTN_ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadTextFile("tls_cert_path", o.tls_cert_path));
    ATTN_ASSIGN_OR_RETURN(ssl.pem_private_key, ReadTextFile("tls_key_path", o.tls_key_path));
  }
  return grpc::SslCredentials(ssl);
}

grpc::ChannelArguments ChannelArgs(const Client::Options& o, const std::string& load_balancing) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(o.max_message_bytes));
  args.SetMaxSendMessageSize(static_cast<int>(o.max_message_bytes));
  args.SetLoadBalancingPolicyName(load_balancing);
  if (o.own_connection) args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return args;
}

}  // namespace

const char* Client::HealthStatusName(HealthStatus status) {
  switch (status) {
    case HealthStatus::kServing: return "SERVING";
    case HealthStatus::kNotServing: return "NOT_SERVING";
    case HealthStatus::kServiceUnknown: return "SERVICE_UNKNOWN";
    case HealthStatus::kUnknown: break;
  }
  return "UNKNOWN";
}

bool Client::IsTraceparent(absl::string_view value) {
  if (value.size() != 55 || value.substr(0, 3) != "00-" || value[35] != '-' || value[52] != '-') return false;
  const auto lower_hex = [](absl::string_view s) {
    return s.find_first_not_of("0123456789abcdef") == absl::string_view::npos;
  };
  const auto not_zero = [](absl::string_view s) { return s.find_first_not_of('0') != absl::string_view::npos; };
  const absl::string_view trace = value.substr(3, 32), span = value.substr(36, 16), flags = value.substr(53, 2);
  return lower_hex(trace) && lower_hex(span) && lower_hex(flags) && not_zero(trace) && not_zero(span);
}

absl::StatusOr<std::unique_ptr<Client>> Client::Create(const Options& options) {
  if (options.target.empty()) return absl::InvalidArgumentError("target: must not be empty");
  if (options.default_timeout_ms < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("default_timeout_ms: must be >= 0, got ", options.default_timeout_ms));
  }
  if (options.max_message_bytes < 1 || options.max_message_bytes > INT_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_message_bytes: must be in [1, 2^31), got ", options.max_message_bytes));
  }
  if (options.load_balancing != "round_robin" && options.load_balancing != "pick_first") {
    return absl::InvalidArgumentError(absl::StrCat("load_balancing: expected round_robin or pick_first, got \"",
                                                   options.load_balancing, "\""));
  }
  if (!options.use_tls && !(options.tls_root_certs_path.empty() && options.tls_cert_path.empty())) {
    return absl::InvalidArgumentError("tls_root_certs_path, tls_cert_path: only meaningful with use_tls");
  }
  if (options.tls_cert_path.empty() != options.tls_key_path.empty()) {
    return absl::InvalidArgumentError("tls_cert_path and tls_key_path go together; one is empty");
  }
  if (!options.traceparent.empty() && !IsTraceparent(options.traceparent)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "traceparent: expected 00-<32 hex digits>-<16 hex digits>-<2 hex digits> (lower case), got \"",
        options.traceparent.substr(0, 80), "\""));
  }
  ATTN_ASSIGN_OR_RETURN(auto credentials, MakeCredentials(options));
  auto channel = grpc::CreateCustomChannel(options.target, credentials, ChannelArgs(options, options.load_balancing));
  return std::unique_ptr<Client>(new Client(options, std::move(credentials), std::move(channel)));
}

std::shared_ptr<grpc::Channel> Client::ChannelTo(const std::string& target) const {
  return grpc::CreateCustomChannel(target, credentials_, ChannelArgs(options_, "pick_first"));
}

absl::StatusOr<Client::Tensor> Client::ReadTensor(const attnserve::v1::Tensor& tensor, const std::string& field) {
  return DecodeFloatTensor(tensor, field);
}

Client::Client(Options options, std::shared_ptr<grpc::ChannelCredentials> credentials,
               std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      credentials_(std::move(credentials)),
      channel_(std::move(channel)),
      stub_(attnserve::v1::AttentionService::NewStub(channel_)) {}

void Client::PrepareContext(grpc::ClientContext* context, std::optional<int64_t> timeout_ms,
                            const std::string& traceparent) const {
  const int64_t ms = timeout_ms.value_or(options_.default_timeout_ms);
  if (ms > 0) context->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(ms));
  if (!options_.token.empty()) context->AddMetadata("authorization", "Bearer " + options_.token);
  const std::string& trace = traceparent.empty() ? options_.traceparent : traceparent;
  if (!trace.empty()) context->AddMetadata("traceparent", trace);
}

absl::StatusOr<std::string> Client::TokenFromEnvironmentOrFile(
    const std::string& token_file, const std::function<const char*(const char*)>& getenv_fn) {
  if (!token_file.empty()) {
    ATTN_ASSIGN_OR_RETURN(const std::string text, ReadTextFile("--token-file", token_file));
    const std::string token(absl::StripAsciiWhitespace(text.substr(0, text.find('\n'))));
    if (token.empty()) return absl::InvalidArgumentError(absl::StrCat("--token-file: \"", token_file, "\" is empty"));
    return token;
  }
  const char* env = getenv_fn ? getenv_fn("ATTNSERVE_TOKEN") : nullptr;
  return std::string(env == nullptr ? "" : env);
}

absl::StatusOr<attnserve::v1::InferRequest> Client::MakeInferRequest(const std::string& layer,
                                                                     absl::Span<const float> query,
                                                                     const std::vector<int64_t>& query_shape,
                                                                     const InferOptions& options) {
  attnserve::v1::InferRequest request;
  request.set_layer(layer);
  ATTN_RETURN_IF_ERROR(EncodeValues("query", query, query_shape, attnserve::v1::FLOAT32, request.mutable_query()));
  if (!options.key.shape.empty()) {
    ATTN_RETURN_IF_ERROR(EncodeValues("key", options.key.values, options.key.shape, attnserve::v1::FLOAT32,
                                 request.mutable_key()));
  }
  if (!options.value.shape.empty()) {
    ATTN_RETURN_IF_ERROR(EncodeValues("value", options.value.values, options.value.shape, attnserve::v1::FLOAT32,
                                 request.mutable_value()));
  }
  // mutable_*() would create the field, which the server reads as "present": only for a given mask.
  if (!options.key_padding_mask.shape.empty()) {
    ATTN_RETURN_IF_ERROR(EncodeMask("key_padding_mask", options.key_padding_mask, request.mutable_key_padding_mask()));
  }
  if (!options.attn_mask.shape.empty()) {
    ATTN_RETURN_IF_ERROR(EncodeMask("attn_mask", options.attn_mask, request.mutable_attn_mask()));
  }
  request.set_is_causal(options.is_causal);
  request.set_need_weights(options.need_weights);
  if (!options.average_attn_weights) request.set_average_attn_weights(false);
  request.set_position_offset(options.position_offset);
  for (int64_t p : options.position_ids) request.add_position_ids(p);
  request.set_id(options.id);
  return request;
}

absl::StatusOr<Client::InferResult> Client::ReadInferResponse(const attnserve::v1::InferResponse& response) {
  if (response.has_error() && response.error().code() != 0) {
    return absl::Status(static_cast<absl::StatusCode>(response.error().code()), response.error().message());
  }
  InferResult result;
  ATTN_ASSIGN_OR_RETURN(result.output, DecodeFloatTensor(response.output(), "output"));
  if (response.has_attn_weights()) {
    ATTN_ASSIGN_OR_RETURN(result.attn_weights, DecodeFloatTensor(response.attn_weights(), "attn_weights"));
  }
  result.timing = {response.timing().queue_us(), response.timing().compute_us(), response.timing().batch_size()};
  result.id = response.id();
  return result;
}

absl::StatusOr<Client::InferResult> Client::Infer(const std::string& layer, absl::Span<const float> query,
                                                  const std::vector<int64_t>& query_shape,
                                                  const InferOptions& options) const {
  ATTN_ASSIGN_OR_RETURN(const attnserve::v1::InferRequest request,
                        MakeInferRequest(layer, query, query_shape, options));
  ATTN_ASSIGN_OR_RETURN(const attnserve::v1::InferResponse response,
                        InferRaw(request, options.timeout_ms, options.traceparent));
  return ReadInferResponse(response);
}

absl::StatusOr<attnserve::v1::InferResponse> Client::InferRaw(const attnserve::v1::InferRequest& request,
                                                              std::optional<int64_t> timeout_ms,
                                                              const std::string& traceparent) const {
  grpc::ClientContext context;
  PrepareContext(&context, timeout_ms, traceparent);
  attnserve::v1::InferResponse response;
  ATTN_RETURN_IF_ERROR(FromGrpcStatus(stub_->Infer(&context, request, &response), context));
  return response;
}

absl::StatusOr<Client::HealthStatus> Client::Health(const std::string& service) const {
  const std::string encoded = EncodeHealthCheckRequest(service);
  grpc::Slice slice(encoded);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  grpc::ClientContext context;
  PrepareContext(&context, std::nullopt);
  grpc::GenericStub generic(channel_);
  grpc::Status status;
  absl::Notification done;
  generic.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                    [&](grpc::Status s) {
                      status = std::move(s);
                      done.Notify();
                    });
  done.WaitForNotification();
  ATTN_RETURN_IF_ERROR(FromGrpcStatus(status));
  grpc::Slice body;
  ATTN_RETURN_IF_ERROR(FromGrpcStatus(response.DumpToSingleSlice(&body)));
  ATTN_ASSIGN_OR_RETURN(const int value, DecodeHealthCheckResponse(absl::string_view(
                                        reinterpret_cast<const char*>(body.begin()), body.size())));
  if (value < 0 || value > 3) return HealthStatus::kUnknown;
  return static_cast<HealthStatus>(value);
}

absl::StatusOr<std::vector<attnserve::v1::Layer>> Client::ListLayers() const {
  grpc::ClientContext context;
  PrepareContext(&context, std::nullopt);
  attnserve::v1::ListLayersResponse response;
  ATTN_RETURN_IF_ERROR(
      FromGrpcStatus(stub_->ListLayers(&context, attnserve::v1::ListLayersRequest(), &response), context));
  return std::vector<attnserve::v1::Layer>(response.layers().begin(), response.layers().end());
}

absl::StatusOr<attnserve::v1::Layer> Client::GetLayer(const std::string& name) const {
  grpc::ClientContext context;
  PrepareContext(&context, std::nullopt);
  attnserve::v1::GetLayerRequest request;
  request.set_name(name);
  attnserve::v1::Layer layer;
  ATTN_RETURN_IF_ERROR(FromGrpcStatus(stub_->GetLayer(&context, request, &layer), context));
  return layer;
}

}  // namespace attnserve
