// Defaults and checks of the config's `security` and `transport` sections (config.proto), apart from the
// layers' so that each stays small. Called by ApplyDefaultsAndValidate.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "attnserve/v1/config.pb.h"

namespace attnserve {

inline constexpr int64_t kDefaultTlsReloadIntervalMs = 10000;
inline constexpr int32_t kDefaultMaxConcurrentStreams = 128;
inline constexpr int64_t kDefaultMaxConnectionIdleMs = 120000;
inline constexpr int64_t kDefaultKeepaliveMinPingIntervalMs = 10000;
inline constexpr int32_t kDefaultMaxPingStrikes = 2;
inline constexpr int64_t kMinGrpcMemoryBytes = int64_t{64} << 20;
inline constexpr int32_t kDefaultGrpcMaxThreads = 256;
inline constexpr int64_t kDefaultMaxMetadataBytes = 16384;
inline constexpr int64_t kDefaultListenerCheckIntervalMs = 5000;
inline constexpr int64_t kDefaultMemoryGuardIntervalMs = 50;
inline constexpr int64_t kDefaultResetFloodCheckIntervalMs = 100;
inline constexpr int64_t kDefaultResetFloodMinStreams = 1000;
inline constexpr int64_t kDefaultStalledReadTimeoutMs = 3000;
inline constexpr int64_t kDefaultMaxConnections = 10000;

// Fills the zero fields of both sections (grpc_memory_bytes stays 0: it follows the memory budget, known
// only once the server starts; see GrpcMemoryBytes).
void ApplySecurityAndTransportDefaults(attnserve::v1::ServerConfig* config);

// Problems found, each starting with the field's path ("security.tls_key_file: ..."): TLS key and
// certificate given together, a client CA only with them, files that exist, no negative limits,
// listener_check_interval_ms and memory_guard_interval_ms -1 or >= 0.
std::vector<std::string> SecurityAndTransportProblems(const attnserve::v1::ServerConfig& config);

// The connection cap: the configured one (-1: none), or 10000, or 3/4 of `file_limit` if that is less.
int64_t MaxConnections(const attnserve::v1::TransportConfig& transport, int64_t file_limit);

// gRPC's transport memory: the configured bytes, or half the memory budget (at least 64 MiB).
int64_t GrpcMemoryBytes(const attnserve::v1::TransportConfig& transport, int64_t memory_budget_bytes);

}  // namespace attnserve
