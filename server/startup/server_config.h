// Loading, defaulting and validating the server's configuration (attnserve.v1.ServerConfig, see
// proto/attnserve/v1/config.proto). The start-up path is: LoadServerConfigFile (or DefaultServerConfig)
// -> command-line overrides (server_flags.h) -> ApplyDefaultsAndValidate.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "attnserve/v1/config.pb.h"

namespace attnserve {

// Defaults filled by ApplyDefaultsAndValidate for fields left at proto3's zero value.
inline constexpr char kDefaultGrpcAddress[] = "0.0.0.0:50051";
inline constexpr char kDefaultMetricsAddress[] = "0.0.0.0:9464";
// worker_threads 0 (the default) = one worker per CPU the server may use, at most this many
// (WorkerThreadsFor in cpu_budget.h): each worker keeps its own OpenMP team.
inline constexpr int32_t kMaxAutoWorkerThreads = 16;
inline constexpr int32_t kDefaultMaxInflightPerStream = 32;
inline constexpr int64_t kDefaultMaxSequenceLength = 4096;
inline constexpr int64_t kDefaultMaxBatch = 256;
inline constexpr int64_t kDefaultMaxTokens = 32768;
inline constexpr int64_t kDefaultMaxResponseBytes = int64_t{32} << 20;
// The largest answer a layer may allow: the gRPC send limit (64 MiB) less room for the message's framing.
inline constexpr int64_t kMaxResponseBytesLimit = int64_t{60} << 20;
// The batching defaults are BatchingOptions' own (server/batching/batch_queue.h).

// Bounds checked by ApplyDefaultsAndValidate.
inline constexpr int32_t kMaxWorkerThreads = 256;
inline constexpr int64_t kMaxSequenceLengthLimit = int64_t{1} << 20;
// A layer name's length at most (names reach logs, metrics labels and error messages).
inline constexpr size_t kMaxLayerNameBytes = 128;
// Versions of one layer kept loaded at most (each holds its weights).
inline constexpr int32_t kMaxVersionsLimit = 8;
// embed_dim, kdim and vdim at most (a projection of 32768^2 floats is 4 GiB).
inline constexpr int64_t kMaxLayerDim = 32768;

// The configuration served when no --config is given: layers "small" (E=256, H=4, seed 1) and "base"
// (E=768, H=12, seed 2) with seeded random weights and default batching. Parsed from an embedded pbtxt
// that is kept identical in meaning to deploy/config/default.pbtxt (a test checks this). Defaults are not
// applied yet: pass the result through ApplyDefaultsAndValidate.
attnserve::v1::ServerConfig DefaultServerConfig();

// Reads a config file, choosing the format by extension:
//   .pbtxt / .textproto / .txtpb  protobuf text format; errors read "PATH:LINE:COL: message" (1-based).
//   .json                         proto3 JSON (lowerCamelCase or original field names).
// Unknown fields are errors in both formats. Errors: NotFound when the file does not exist,
// InvalidArgument for any other extension (naming the path and the accepted ones) or a parse error, the
// errno-derived code for other read failures. Defaults are not applied and nothing is validated.
absl::StatusOr<attnserve::v1::ServerConfig> LoadServerConfigFile(const std::string& path);

// Fills defaults for fields left at zero, then validates the whole config.
// Defaults: grpc_address "0.0.0.0:50051", metrics_address "0.0.0.0:9464"; worker_threads 0 stays 0 (one per
// CPU, resolved by the Server); per layer:
// bias true (set explicitly, so it shows when the config is printed), kdim/vdim = embed_dim (only when
// embed_dim > 0), max_sequence_length 4096, batching.max_batch_size 32, max_queue_size 1024,
// max_batch_tokens 8192, max_batch 256, max_tokens 32768, max_response_bytes 32 MiB; server:
// max_inflight_per_stream 32. batching.max_queue_delay_us 0 stays 0: it means "eager", i.e. a batch closes
// as soon as a worker is free to take it.
// Validation reports every problem it finds, joined by "; ", each starting with the field's path, e.g.
// `layers[1].num_heads: 5 does not divide embed_dim 768`. Checks: at least one layer; unique layer
// names matching [A-Za-z0-9_.-]+; positive dims with num_heads | embed_dim; no negative values;
// worker_threads in [0, 256]; max_sequence_length <= 1<<20; max_batch_size <= max_queue_size;
// weights_path (relative to the working directory) names an existing regular file; weights_prefix only
// with weights_path; addresses of the form host:port (see CheckHostPort), grpc and metrics not the same.
// Returns InvalidArgument on any problem; `config` keeps its defaulted values either way.
absl::Status ApplyDefaultsAndValidate(attnserve::v1::ServerConfig* config);

// The same for one layer on its own (one loaded while the server runs): its defaults, then its checks,
// with paths starting "layer" (e.g. "layer.num_heads: 5 does not divide embed_dim 768").
absl::Status ApplyLayerDefaultsAndValidate(attnserve::v1::LayerConfig* layer);

// OK when `address` is host:port: host a name or IPv4 address ("localhost", "0.0.0.0") or a bracketed
// IPv6 address ("[::]"), port a decimal in [0, 65535] (0: the OS picks a free port). Otherwise
// InvalidArgument saying what is wrong, without a field name (callers prefix their own).
absl::Status CheckHostPort(const std::string& address);

}  // namespace attnserve
