#include "server/startup/server_flags.h"

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/command_line.h"
#include "common/duration.h"
#include "common/status_macros.h"
#include "server/startup/server_config.h"

namespace attnserve {
namespace {

using Setter = absl::Status (*)(const FlagValue&, ServerFlags*);

// A value flag: how the parser reads it (name, variable, value name), how --help shows it, and where its
// checked value goes.
struct ServerFlag {
  FlagSpec spec;
  const char* default_text;
  const char* help;
  Setter set;
};

absl::Status SetConfig(const FlagValue& value, ServerFlags* f) {
  f->config_path = value.text;
  return absl::OkStatus();
}

absl::Status SetAddress(const FlagValue& value, std::optional<std::string>* out) {
  const absl::Status status = CheckHostPort(value.text);
  if (!status.ok()) return FlagError(value, status);
  *out = value.text;
  return absl::OkStatus();
}
absl::Status SetGrpcAddress(const FlagValue& value, ServerFlags* f) { return SetAddress(value, &f->grpc_address); }
absl::Status SetMetricsAddress(const FlagValue& value, ServerFlags* f) {
  return SetAddress(value, &f->metrics_address);
}

absl::Status SetHealthAddress(const FlagValue& value, ServerFlags* f) {
  return SetAddress(value, &f->health_address);
}

absl::Status SetWorkerThreads(const FlagValue& value, ServerFlags* f) {
  int32_t n = 0;
  if (!absl::SimpleAtoi(value.text, &n)) return BadFlagValue(value, "expected an integer");
  if (n < 0 || n > kMaxWorkerThreads) {
    return BadFlagValue(value, absl::StrCat("must be between 0 (one per CPU) and ", kMaxWorkerThreads));
  }
  f->worker_threads = n;
  return absl::OkStatus();
}

absl::Status SetOneOf(const FlagValue& value, const std::vector<std::string>& allowed, std::string* out) {
  const std::string lower = absl::AsciiStrToLower(value.text);
  for (const std::string& a : allowed) {
    if (lower == a) {
      *out = lower;
      return absl::OkStatus();
    }
  }
  return BadFlagValue(value, absl::StrCat("expected one of ", absl::StrJoin(allowed, "|")));
}
absl::Status SetLogLevel(const FlagValue& value, ServerFlags* f) {
  return SetOneOf(value, {"trace", "debug", "info", "warn", "error", "off"}, &f->log_level);
}
absl::Status SetLogFormat(const FlagValue& value, ServerFlags* f) {
  return SetOneOf(value, {"text", "json"}, &f->log_format);
}
absl::Status SetAccessLog(const FlagValue& value, ServerFlags* f) {
  f->access_log = value.text;
  return absl::OkStatus();
}

absl::Status SetShutdownGrace(const FlagValue& value, ServerFlags* f) {
  absl::StatusOr<absl::Duration> grace = ParseDuration(value.text);
  if (!grace.ok()) return FlagError(value, grace.status());
  f->shutdown_grace = *grace;
  return absl::OkStatus();
}

// A flag's value as a count in [1, max].
absl::StatusOr<int64_t> PositiveCount(const FlagValue& value, int64_t max) {
  int64_t n = 0;
  if (!absl::SimpleAtoi(value.text, &n) || n < 1 || n > max) {
    return BadFlagValue(value, absl::StrCat("expected an integer between 1 and ", max));
  }
  return n;
}

// A flag's value as a positive duration in milliseconds ("10s", "500ms", "2m").
absl::StatusOr<int64_t> PositiveMillis(const FlagValue& value) {
  absl::StatusOr<absl::Duration> d = ParseDuration(value.text);
  if (!d.ok()) return FlagError(value, d.status());
  if (*d < absl::Milliseconds(1)) return BadFlagValue(value, "expected at least 1ms");
  return absl::ToInt64Milliseconds(*d);
}

// The security and transport flags write straight into the config sections they override.
using attnserve::v1::SecurityConfig;
using attnserve::v1::TransportConfig;
template <void (SecurityConfig::*kSet)(const std::string&)>
absl::Status SetSecurityPath(const FlagValue& value, ServerFlags* f) {
  (f->security.*kSet)(value.text);
  return absl::OkStatus();
}
template <typename T, void (TransportConfig::*kSet)(T), int64_t kMax>
absl::Status SetTransportCount(const FlagValue& value, ServerFlags* f) {
  ATTN_ASSIGN_OR_RETURN(const int64_t n, PositiveCount(value, kMax));
  (f->transport.*kSet)(static_cast<T>(n));
  return absl::OkStatus();
}
template <void (TransportConfig::*kSet)(int64_t)>
absl::Status SetTransportMillis(const FlagValue& value, ServerFlags* f) {
  ATTN_ASSIGN_OR_RETURN(const int64_t ms, PositiveMillis(value));
  (f->transport.*kSet)(ms);
  return absl::OkStatus();
}
// A duration, or "never" (-1).
template <void (TransportConfig::*kSet)(int64_t)>
absl::Status SetTransportIntervalOrNever(const FlagValue& value, ServerFlags* f) {
  if (absl::AsciiStrToLower(value.text) == "never") {
    (f->transport.*kSet)(-1);
    return absl::OkStatus();
  }
  return SetTransportMillis<kSet>(value, f);
}

// The transport's flags (config.proto's TransportConfig), last in --help.
std::vector<ServerFlag> TransportFlags() {
  return {
      {{"max-concurrent-streams", true, "ATTNSERVE_MAX_CONCURRENT_STREAMS", "N"},
       "128",
       "Concurrent calls on one connection.",
       &SetTransportCount<int32_t, &TransportConfig::set_max_concurrent_streams, 1 << 20>},
      {{"max-connection-idle", true, "ATTNSERVE_MAX_CONNECTION_IDLE", "DURATION"},
       "2m",
       "Connections without a call for this long are closed (they hold file descriptors).",
       &SetTransportMillis<&TransportConfig::set_max_connection_idle_ms>},
      {{"keepalive-min-ping-interval", true, "ATTNSERVE_KEEPALIVE_MIN_PING_INTERVAL", "DURATION"},
       "10s",
       "Client pings closer than this without data are strikes.",
       &SetTransportMillis<&TransportConfig::set_keepalive_min_ping_interval_ms>},
      {{"max-ping-strikes", true, "ATTNSERVE_MAX_PING_STRIKES", "N"},
       "2",
       "Strikes before a connection is closed (GOAWAY ENHANCE_YOUR_CALM).",
       &SetTransportCount<int32_t, &TransportConfig::set_max_ping_strikes, 1000>},
      {{"grpc-memory-bytes", true, "ATTNSERVE_GRPC_MEMORY_BYTES", "BYTES"},
       "(half the memory budget)",
       "Bytes gRPC's transport buffers may hold (its resource quota).",
       &SetTransportCount<int64_t, &TransportConfig::set_grpc_memory_bytes, int64_t{1} << 40>},
      {{"grpc-max-threads", true, "ATTNSERVE_GRPC_MAX_THREADS", "N"},
       "256",
       "Threads gRPC may start (its resource quota).",
       &SetTransportCount<int32_t, &TransportConfig::set_grpc_max_threads, 1 << 16>},
      {{"max-metadata-bytes", true, "ATTNSERVE_MAX_METADATA_BYTES", "BYTES"},
       "16384",
       "Bytes of request metadata (headers) a call may carry.",
       &SetTransportCount<int64_t, &TransportConfig::set_max_metadata_bytes, int64_t{1} << 24>},
      {{"listener-check-interval", true, "ATTNSERVE_LISTENER_CHECK_INTERVAL", "DURATION"},
       "5s",
       "How often the server checks its gRPC port still accepts (unaccepted for 12 intervals: drain, exit 3); "
       "\"never\": off.",
       &SetTransportIntervalOrNever<&TransportConfig::set_listener_check_interval_ms>},
      {{"max-connections", true, "ATTNSERVE_MAX_CONNECTIONS", "N"},
       "(10000, or 3/4 of the file limit)",
       "Connections to the gRPC port at most; beyond, those that sent least are shut down (checked each second).",
       &SetTransportCount<int64_t, &TransportConfig::set_max_connections, int64_t{1} << 30>},
      {{"memory-guard-interval", true, "ATTNSERVE_MEMORY_GUARD_INTERVAL", "DURATION"},
       "50ms",
       "How often RSS is checked against RSS at start + budget + 2 x gRPC memory + KV cache; above it, the "
       "connection holding the most undelivered bytes is shut down; \"never\": off.",
       &SetTransportIntervalOrNever<&TransportConfig::set_memory_guard_interval_ms>},
      {{"reset-flood-check-interval", true, "ATTNSERVE_RESET_FLOOD_CHECK_INTERVAL", "DURATION"},
       "100ms",
       "How often each connection's stream counts are read; one that opened --reset-flood-min-streams streams, "
       "more than half reset before the server finished them (rapid reset), is shut down; \"never\": off.",
       &SetTransportIntervalOrNever<&TransportConfig::set_reset_flood_check_interval_ms>},
      {{"reset-flood-min-streams", true, "ATTNSERVE_RESET_FLOOD_MIN_STREAMS", "N"},
       "1000",
       "Streams a connection must have opened before it can be judged a reset flood.",
       &SetTransportCount<int64_t, &TransportConfig::set_reset_flood_min_streams, int64_t{1} << 40>},
      {{"stalled-read-timeout", true, "ATTNSERVE_STALLED_READ_TIMEOUT", "DURATION"},
       "3s",
       "How long a connection may keep 16 KiB+ unread by gRPC with nothing delivered as a message before it is "
       "shut down (a header value in endless CONTINUATION frames); checked each second; \"never\": off.",
       &SetTransportIntervalOrNever<&TransportConfig::set_stalled_read_timeout_ms>},
  };
}

// The flags of what the server serves, where, how it logs, and who may call.
std::vector<ServerFlag> ServingFlags() {
  return {
      {{"config", true, "ATTNSERVE_CONFIG", "FILE"}, "(embedded: small + base layers)",
       "Config file: .pbtxt/.textproto/.txtpb (protobuf text) or .json.", &SetConfig},
      {{"grpc-address", true, "ATTNSERVE_GRPC_ADDRESS", "HOST:PORT"}, kDefaultGrpcAddress,
       "gRPC listen address; overrides the config's grpc_address. Port 0 picks a free port.", &SetGrpcAddress},
      {{"metrics-address", true, "ATTNSERVE_METRICS_ADDRESS", "HOST:PORT"}, kDefaultMetricsAddress,
       "Prometheus /metrics listen address; overrides the config's metrics_address.", &SetMetricsAddress},
      {{"health-address", true, "ATTNSERVE_HEALTH_ADDRESS", "HOST:PORT"}, "(none)",
       "Plaintext listener serving only grpc.health.v1 (probes that cannot speak TLS).", &SetHealthAddress},
      {{"worker-threads", true, "ATTNSERVE_WORKER_THREADS", "N"}, "0",
       "Threads computing batches (0-256, 0 = one per CPU); overrides the config's worker_threads.", &SetWorkerThreads},
      {{"log-level", true, "ATTNSERVE_LOG_LEVEL", "LEVEL"}, "info", "Log level: trace|debug|info|warn|error|off.",
       &SetLogLevel},
      {{"log-format", true, "ATTNSERVE_LOG_FORMAT", "FORMAT"}, "text", "Log line format: text|json.",
       &SetLogFormat},
      {{"access-log", true, "ATTNSERVE_ACCESS_LOG", "PATH"}, "(off)",
       "One JSON line per inference request (with its trace id): \"-\" for stdout, or a file appended to.",
       &SetAccessLog},
      {{"shutdown-grace", true, "ATTNSERVE_SHUTDOWN_GRACE", "DURATION"}, "30s",
       "On shutdown, how long in-flight requests may finish: \"30s\", \"500ms\", \"2m\" or seconds.",
       &SetShutdownGrace},
      {{"tls-cert-file", true, "ATTNSERVE_TLS_CERT_FILE", "FILE"}, "(none: plaintext)",
       "PEM certificate chain of the gRPC port; with --tls-key-file the port speaks TLS only. Re-read when it "
       "changes.",
       &SetSecurityPath<&SecurityConfig::set_tls_cert_file>},
      {{"tls-key-file", true, "ATTNSERVE_TLS_KEY_FILE", "FILE"}, "(none)", "PEM private key of --tls-cert-file.",
       &SetSecurityPath<&SecurityConfig::set_tls_key_file>},
      {{"tls-client-ca-file", true, "ATTNSERVE_TLS_CLIENT_CA_FILE", "FILE"}, "(none: no client certificates)",
       "PEM CA bundle: every client must present a certificate it signed (mTLS).",
       &SetSecurityPath<&SecurityConfig::set_tls_client_ca_file>},
      {{"auth-token-file", true, "ATTNSERVE_AUTH_TOKEN_FILE", "FILE"}, "(none: no tokens)",
       "Lines \"sha256:<hex of token> infer[,admin]\"; calls then need \"authorization: Bearer <token>\" "
       "(health checks excepted). Reloaded on change.",
       &SetSecurityPath<&SecurityConfig::set_auth_token_file>},
      {{"metrics-auth-file", true, "ATTNSERVE_METRICS_AUTH_FILE", "FILE"}, "(none: /metrics open)",
       "Lines \"<user> sha256:<hex of password>\": /metrics then needs HTTP basic auth. Reloaded on change.",
       &SetSecurityPath<&SecurityConfig::set_metrics_auth_file>},
  };
}

// The value flags, in --help order.
const std::vector<ServerFlag>& Flags() {
  static const auto* flags = [] {
    auto* all = new std::vector<ServerFlag>(ServingFlags());
    for (ServerFlag& flag : TransportFlags()) all->push_back(std::move(flag));
    return all;
  }();
  return *flags;
}

// What the parser accepts: the value flags and the two switches.
const std::vector<FlagSpec>& ParserSpecs() {
  static const auto* specs = [] {
    auto* out = new std::vector<FlagSpec>{{"help", false}, {"version", false}, {"disable-reflection", false},
                                          {"enable-model-control", false}};
    for (const ServerFlag& flag : Flags()) out->push_back(flag.spec);
    return out;
  }();
  return *specs;
}

}  // namespace

absl::StatusOr<ServerFlags> ParseServerFlags(int argc, const char* const* argv,
                                             const std::function<const char*(const char*)>& getenv_fn) {
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) args.push_back(argv[i] == nullptr ? "" : argv[i]);
  ATTN_ASSIGN_OR_RETURN(const CommandLine cl, ParseCommandLine(args, ParserSpecs(), getenv_fn));
  if (!cl.positional.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("unexpected argument \"", cl.positional[0], "\"; flags start with -- (see --help)"));
  }
  ServerFlags flags;
  flags.help = cl.Has("help");
  flags.version = cl.Has("version");
  if (cl.Has("disable-reflection")) flags.security.set_disable_reflection(true);
  if (cl.Has("enable-model-control")) flags.security.set_enable_model_control(true);
  // Values go unchecked then, so help works with a broken environment; unknown flags were refused above.
  if (flags.help || flags.version) return flags;

  for (const ServerFlag& flag : Flags()) {
    if (const FlagValue* value = cl.Find(flag.spec.name)) ATTN_RETURN_IF_ERROR(flag.set(*value, &flags));
  }
  return flags;
}

std::string ServerUsage() {
  std::string out = absl::StrCat(
      "Usage: attnserve [flags]\n"
      "\n"
      "Serves multi-head attention layers over gRPC (attnserve.v1), with Prometheus metrics.\n"
      "Each flag may also be set by its environment variable; the command line wins. Flags also\n"
      "override the config file's fields of the same name.\n"
      "\n"
      "Flags (--flag=value or --flag value):\n");
  for (const ServerFlag& flag : Flags()) {
    absl::StrAppend(&out, "  --", flag.spec.name, " ", flag.spec.value_name, "\n", "      ", flag.help, "\n",
                    "      env: ", flag.spec.env, "    default: ", flag.default_text, "\n");
  }
  absl::StrAppend(&out,
                  "  --disable-reflection\n"
                  "      Do not serve gRPC reflection.\n"
                  "  --enable-model-control\n"
                  "      Allow loading and unloading layers over gRPC without tokens (with tokens: admin only).\n"
                  "  -h, --help\n"
                  "      Print this help and exit.\n"
                  "  --version\n"
                  "      Print the version (",
                  kAttnserveVersion, ") and exit.\n");
  return out;
}

void ApplyFlagsToConfig(const ServerFlags& flags, attnserve::v1::ServerConfig* config) {
  if (flags.grpc_address) config->set_grpc_address(*flags.grpc_address);
  if (flags.metrics_address) config->set_metrics_address(*flags.metrics_address);
  if (flags.worker_threads) config->set_worker_threads(*flags.worker_threads);
  if (flags.health_address) config->set_health_address(*flags.health_address);
  config->mutable_security()->MergeFrom(flags.security);  // proto3 merge: only the fields flags set
  config->mutable_transport()->MergeFrom(flags.transport);
}

absl::StatusOr<attnserve::v1::ServerConfig> BuildServerConfig(const ServerFlags& flags) {
  attnserve::v1::ServerConfig config;
  std::string source;
  if (flags.config_path.empty()) {
    config = DefaultServerConfig();
    source = "embedded default config";
  } else {
    ATTN_ASSIGN_OR_RETURN(config, LoadServerConfigFile(flags.config_path));  // errors already name the path
    source = flags.config_path;
  }
  ApplyFlagsToConfig(flags, &config);
  const absl::Status status = ApplyDefaultsAndValidate(&config);
  if (!status.ok()) return absl::Status(status.code(), absl::StrCat(source, ": ", status.message()));
  return config;
}

}  // namespace attnserve
