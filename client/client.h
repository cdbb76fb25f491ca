// attnserve::Client: a small C++ client of attnserve.v1.AttentionService and grpc.health.v1.Health over one
// gRPC channel. Infer takes caller-owned float spans and shapes and returns owning tensors; InferRaw is the
// protobuf-level call for tools that build requests themselves.
//
// Several servers: give a target that resolves to several addresses ("ipv4:10.0.0.1:50051,10.0.0.2:50051"
// or "dns:///attnserve-headless:50051", a headless Kubernetes Service) and the channel's round_robin policy
// (the default here) spreads the calls over all of them, skipping the ones it cannot reach.
//
// Thread-safety: every method may be called from any number of threads at once.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "attnserve/v1/attention.grpc.pb.h"

namespace attnserve {

class Client {
 public:
  struct Options {
    // gRPC target: "host:port", "ipv4:127.0.0.1:50051,127.0.0.1:50052" or "dns:///name:50051". Required.
    std::string target;
    // TLS instead of plaintext.
    bool use_tls = false;
    // With use_tls: PEM file of the root certificates the server's certificate must chain to; empty uses
    // gRPC's defaults (GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, else the bundled roots).
    std::string tls_root_certs_path;
    // With use_tls, for servers that require client certificates (mTLS): PEM files of this client's
    // certificate chain and private key; both or neither.
    std::string tls_cert_path;
    std::string tls_key_path;
    // Sent as "authorization: Bearer <token>" on every call (servers started with --auth-token-file).
    // Empty: none. See TokenFromEnvironmentOrFile for the tools' --token-file / ATTNSERVE_TOKEN rule.
    std::string token;
    // Deadline of every call that does not set its own, in milliseconds; 0 means no deadline.
    int64_t default_timeout_ms = 30'000;
    // Largest message sent or received, in bytes (the server's own limit is 64 MiB).
    int64_t max_message_bytes = int64_t{64} << 20;
    // gRPC load-balancing policy over the target's addresses: "round_robin" spreads calls over every address
    // (with a single address it behaves as pick_first), "pick_first" uses one until it fails.
    std::string load_balancing = "round_robin";
    // W3C Trace Context: sent as "traceparent" on every call ("00-<32 hex trace id>-<16 hex span id>-<2 hex
    // flags>"), so the server's span joins the caller's trace. Empty: none; the server then starts a trace per
    // call. Either way an error's message ends in the server's " [trace_id <id>]", the id its logs carry.
    std::string traceparent;
    // True: this client's channel opens connections of its own. gRPC otherwise shares one connection per
    // address among all channels with the same arguments, so several clients in one process would multiplex
    // onto a single HTTP/2 connection, which each side processes on one thread at a time.
    bool own_connection = false;
  };

  // A caller-owned FLOAT32 input, row-major; absent while `shape` is empty.
  struct FloatInput {
    absl::Span<const float> values;
    std::vector<int64_t> shape;
  };

  // A caller-owned mask, row-major; absent while `shape` is empty. BOOL (one byte per value, nonzero = true
  // = masked out) or FLOAT32 (added to the attention scores).
  struct MaskInput {
    absl::Span<const uint8_t> bool_values;
    absl::Span<const float> float_values;
    std::vector<int64_t> shape;
    bool is_bool = false;

    static MaskInput Bool(absl::Span<const uint8_t> values, std::vector<int64_t> shape) {
      return {values, {}, std::move(shape), true};
    }
    static MaskInput Float(absl::Span<const float> values, std::vector<int64_t> shape) {
      return {{}, values, std::move(shape), false};
    }
  };

  // Everything of an InferRequest but the layer and the query (see attention.proto for the semantics).
  struct InferOptions {
    FloatInput key;    // [B, S, kdim]; leave key and value absent for self-attention
    FloatInput value;  // [B, S, vdim]
    MaskInput key_padding_mask;  // [B, S]
    MaskInput attn_mask;         // [L, S] or [B*H, L, S]
    bool is_causal = false;
    bool need_weights = false;
    bool average_attn_weights = true;
    // DECODER_ATTENTION layers: the rotary position of each sequence's first token, or one position per token
    // ([B, L] row-major; overrides the offset).
    int64_t position_offset = 0;
    std::vector<int64_t> position_ids;
    // This call's deadline in milliseconds; unset: Options::default_timeout_ms; 0: none.
    std::optional<int64_t> timeout_ms;
    std::string id;
    // This call's traceparent; empty: Options::traceparent.
    std::string traceparent;
  };

  // An owning row-major FLOAT32 tensor.
  struct Tensor {
    std::vector<int64_t> shape;
    std::vector<float> values;
  };

  // Where the server spent the request's time.
  struct Timing {
    int64_t queue_us = 0;
    int64_t compute_us = 0;
    int32_t batch_size = 0;
  };

  struct InferResult {
    Tensor output;        // [B, L, E] ([L, E] unbatched)
    Tensor attn_weights;  // only with need_weights, else empty
    Timing timing;
    std::string id;
  };

  enum class HealthStatus { kUnknown = 0, kServing = 1, kNotServing = 2, kServiceUnknown = 3 };
  // "SERVING", "NOT_SERVING", ...
  static const char* HealthStatusName(HealthStatus status);

  // InvalidArgument for a missing target, negative timeout, message size outside [1, 2^31), an unknown
  // load-balancing policy, or a root-certificates path without use_tls; NotFound when that file cannot be
  // read. Does not connect: the first call does (and fails with UNAVAILABLE when nothing answers).
  static absl::StatusOr<std::unique_ptr<Client>> Create(const Options& options);

  // One attention forward pass. Errors are the server's (NOT_FOUND for an unknown layer, INVALID_ARGUMENT
  // for a bad shape, UNAVAILABLE when no server can be reached, DEADLINE_EXCEEDED), or InvalidArgument
  // before sending when a span's length does not match its shape.
  absl::StatusOr<InferResult> Infer(const std::string& layer, absl::Span<const float> query,
                                    const std::vector<int64_t>& query_shape, const InferOptions& options) const;
  absl::StatusOr<InferResult> Infer(const std::string& layer, absl::Span<const float> query,
                                    const std::vector<int64_t>& query_shape) const {
    return Infer(layer, query, query_shape, InferOptions());
  }

  // The same call on protobufs, for tools. `timeout_ms` and `traceparent` as in InferOptions.
  absl::StatusOr<attnserve::v1::InferResponse> InferRaw(const attnserve::v1::InferRequest& request,
                                                        std::optional<int64_t> timeout_ms = std::nullopt,
                                                        const std::string& traceparent = "") const;

  // grpc.health.v1.Health/Check of `service` ("" is the whole server). NotFound for a service the server
  // does not know.
  absl::StatusOr<HealthStatus> Health(const std::string& service = "") const;

  absl::StatusOr<std::vector<attnserve::v1::Layer>> ListLayers() const;
  absl::StatusOr<attnserve::v1::Layer> GetLayer(const std::string& name) const;

  // What Infer sends, and how it reads the answer (InvalidArgument / Internal naming the bad tensor).
  static absl::StatusOr<attnserve::v1::InferRequest> MakeInferRequest(const std::string& layer,
                                                                      absl::Span<const float> query,
                                                                      const std::vector<int64_t>& query_shape,
                                                                      const InferOptions& options);
  static absl::StatusOr<InferResult> ReadInferResponse(const attnserve::v1::InferResponse& response);

  // For tools that use the channel directly (streams, other services): the channel, its stub, and the
  // deadline rule of this client applied to a context (`timeout_ms` as in InferOptions).
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  attnserve::v1::AttentionService::Stub* stub() const { return stub_.get(); }
  // Sets the deadline (`timeout_ms` as in InferOptions), the token's authorization metadata and the
  // traceparent (`traceparent`, else Options::traceparent).
  void PrepareContext(grpc::ClientContext* context, std::optional<int64_t> timeout_ms,
                      const std::string& traceparent = "") const;

  // A well-formed version-00 W3C traceparent (what Create accepts as Options::traceparent).
  static bool IsTraceparent(absl::string_view value);

  // A channel with this client's credentials and limits to another target (one address: pick_first), for
  // calls that must reach one server (a session's).
  std::shared_ptr<grpc::Channel> ChannelTo(const std::string& target) const;
  // A FLOAT32 tensor of a response (Internal naming `field` when its values do not match its shape).
  static absl::StatusOr<Tensor> ReadTensor(const attnserve::v1::Tensor& tensor, const std::string& field);

  // The token of the tools: the file's first line when `token_file` is given (NotFound when it cannot be
  // read, InvalidArgument when it is empty), else $ATTNSERVE_TOKEN through `getenv_fn`, else "".
  static absl::StatusOr<std::string> TokenFromEnvironmentOrFile(
      const std::string& token_file, const std::function<const char*(const char*)>& getenv_fn);
  const Options& options() const { return options_; }

 private:
  Client(Options options, std::shared_ptr<grpc::ChannelCredentials> credentials,
         std::shared_ptr<grpc::Channel> channel);

  Options options_;
  std::shared_ptr<grpc::ChannelCredentials> credentials_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<attnserve::v1::AttentionService::Stub> stub_;
};

}  // namespace attnserve
