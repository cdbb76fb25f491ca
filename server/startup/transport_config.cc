#include "server/startup/transport_config.h"

#include <sys/stat.h>

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace attnserve {
namespace {

using attnserve::v1::SecurityConfig;
using attnserve::v1::TransportConfig;

void CheckFile(const std::string& field, const std::string& path, std::vector<std::string>* problems) {
  struct stat st {};
  if (path.empty()) return;
  if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    problems->push_back(absl::StrCat("security.", field, ": \"", path, "\" is not a readable file"));
  }
}

void SecurityProblems(const SecurityConfig& s, std::vector<std::string>* problems) {
  if (s.tls_cert_file().empty() != s.tls_key_file().empty()) {
    problems->push_back("security.tls_key_file: tls_cert_file and tls_key_file go together; one is empty");
  }
  if (!s.tls_client_ca_file().empty() && s.tls_cert_file().empty()) {
    problems->push_back("security.tls_client_ca_file: needs tls_cert_file and tls_key_file (mTLS is TLS)");
  }
  if (s.tls_reload_interval_ms() < 0) {
    problems->push_back(
        absl::StrCat("security.tls_reload_interval_ms: must be >= 0, got ", s.tls_reload_interval_ms()));
  }
  CheckFile("tls_cert_file", s.tls_cert_file(), problems);
  CheckFile("tls_key_file", s.tls_key_file(), problems);
  CheckFile("tls_client_ca_file", s.tls_client_ca_file(), problems);
  CheckFile("auth_token_file", s.auth_token_file(), problems);
  CheckFile("metrics_auth_file", s.metrics_auth_file(), problems);
}

void TransportProblems(const TransportConfig& t, std::vector<std::string>* problems) {
  const auto negative = [problems](const char* field, int64_t value) {
    if (value < 0) problems->push_back(absl::StrCat("transport.", field, ": must be >= 0, got ", value));
  };
  negative("max_concurrent_streams", t.max_concurrent_streams());
  negative("max_connection_idle_ms", t.max_connection_idle_ms());
  negative("keepalive_min_ping_interval_ms", t.keepalive_min_ping_interval_ms());
  negative("max_ping_strikes", t.max_ping_strikes());
  negative("grpc_memory_bytes", t.grpc_memory_bytes());
  negative("grpc_max_threads", t.grpc_max_threads());
  negative("max_metadata_bytes", t.max_metadata_bytes());
  negative("memory_guard_headroom_bytes", t.memory_guard_headroom_bytes());
  negative("reset_flood_min_streams", t.reset_flood_min_streams());
  const auto interval = [problems](const char* field, int64_t value) {
    if (value < -1) problems->push_back(absl::StrCat("transport.", field, ": must be -1 (never) or >= 0, got ", value));
  };
  interval("listener_check_interval_ms", t.listener_check_interval_ms());
  interval("memory_guard_interval_ms", t.memory_guard_interval_ms());
  interval("reset_flood_check_interval_ms", t.reset_flood_check_interval_ms());
  interval("stalled_read_timeout_ms", t.stalled_read_timeout_ms());
  if (t.max_connections() < -1) {
    problems->push_back(
        absl::StrCat("transport.max_connections: must be -1 (no cap) or >= 0, got ", t.max_connections()));
  }
}

}  // namespace

void ApplySecurityAndTransportDefaults(attnserve::v1::ServerConfig* config) {
  SecurityConfig* s = config->mutable_security();
  if (s->tls_reload_interval_ms() == 0) s->set_tls_reload_interval_ms(kDefaultTlsReloadIntervalMs);
  TransportConfig* t = config->mutable_transport();
  if (t->max_concurrent_streams() == 0) t->set_max_concurrent_streams(kDefaultMaxConcurrentStreams);
  if (t->max_connection_idle_ms() == 0) t->set_max_connection_idle_ms(kDefaultMaxConnectionIdleMs);
  if (t->keepalive_min_ping_interval_ms() == 0) {
    t->set_keepalive_min_ping_interval_ms(kDefaultKeepaliveMinPingIntervalMs);
  }
  if (t->max_ping_strikes() == 0) t->set_max_ping_strikes(kDefaultMaxPingStrikes);
  if (t->grpc_max_threads() == 0) t->set_grpc_max_threads(kDefaultGrpcMaxThreads);
  if (t->max_metadata_bytes() == 0) t->set_max_metadata_bytes(kDefaultMaxMetadataBytes);
  if (t->listener_check_interval_ms() == 0) t->set_listener_check_interval_ms(kDefaultListenerCheckIntervalMs);
  if (t->memory_guard_interval_ms() == 0) t->set_memory_guard_interval_ms(kDefaultMemoryGuardIntervalMs);
  if (t->reset_flood_check_interval_ms() == 0) {
    t->set_reset_flood_check_interval_ms(kDefaultResetFloodCheckIntervalMs);
  }
  if (t->reset_flood_min_streams() == 0) t->set_reset_flood_min_streams(kDefaultResetFloodMinStreams);
  if (t->stalled_read_timeout_ms() == 0) t->set_stalled_read_timeout_ms(kDefaultStalledReadTimeoutMs);
}

std::vector<std::string> SecurityAndTransportProblems(const attnserve::v1::ServerConfig& config) {
  std::vector<std::string> problems;
  SecurityProblems(config.security(), &problems);
  TransportProblems(config.transport(), &problems);
  return problems;
}

int64_t MaxConnections(const TransportConfig& transport, int64_t file_limit) {
  if (transport.max_connections() != 0) return transport.max_connections();
  return std::min(kDefaultMaxConnections, file_limit / 4 * 3);
}

int64_t GrpcMemoryBytes(const TransportConfig& transport, int64_t memory_budget_bytes) {
  if (transport.grpc_memory_bytes() > 0) return transport.grpc_memory_bytes();
  // gRPC's quota is soft: it reclaims (resets a stream) asynchronously, and a fast sender keeps landing
  // bytes until that runs; half the budget leaves the other half for that overshoot on a loaded machine.
  return std::max(kMinGrpcMemoryBytes, memory_budget_bytes / 2);
}

}  // namespace attnserve
