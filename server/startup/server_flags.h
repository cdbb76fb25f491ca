// attnserve's command line: flags, their environment variables, and how they combine with the config file.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "attnserve/v1/config.pb.h"
#include "common/version.h"  // kAttnserveVersion, printed by --version

namespace attnserve {

// The parsed command line. Optional fields are set only when the flag or its variable was given, so the
// config file's value stands otherwise.
struct ServerFlags {
  std::string config_path;                      // --config; empty: the embedded DefaultServerConfig()
  std::optional<std::string> grpc_address;      // --grpc-address host:port
  std::optional<std::string> metrics_address;   // --metrics-address host:port
  std::optional<std::string> health_address;    // --health-address host:port
  std::optional<int32_t> worker_threads;        // --worker-threads, in [0, 256]
  std::string log_level = "info";               // --log-level trace|debug|info|warn|error|off
  std::string log_format = "text";              // --log-format text|json
  std::string access_log;                       // --access-log PATH ("-": stdout); empty: off
  absl::Duration shutdown_grace = absl::Seconds(30);  // --shutdown-grace: "30s", "500ms", "2m" or plain seconds "30"
  // --tls-*, --auth-token-file, --metrics-auth-file, --disable-reflection, --enable-model-control: only the
  // fields given are set.
  attnserve::v1::SecurityConfig security;
  // --max-concurrent-streams, --max-connection-idle, --keepalive-min-ping-interval, --max-ping-strikes,
  // --grpc-memory-bytes, --listener-check-interval, --memory-guard-interval ("never" = -1), --max-connections:
  // only the fields given are set.
  attnserve::v1::TransportConfig transport;
  bool help = false;                            // --help / -h
  bool version = false;                         // --version
};

// Parses argv[1..argc) (argv[0] is the program), accepting both --flag=value and --flag value; a repeated
// flag keeps its last value. Each value flag can also come from an environment variable, read through
// `getenv_fn` (pass std::getenv; an empty function reads none): ATTNSERVE_CONFIG, ATTNSERVE_GRPC_ADDRESS,
// ATTNSERVE_METRICS_ADDRESS, ATTNSERVE_WORKER_THREADS, ATTNSERVE_LOG_LEVEL, ATTNSERVE_LOG_FORMAT,
// ATTNSERVE_SHUTDOWN_GRACE, and ATTNSERVE_ with the flag's name for the others (--help lists them). A variable set to
// "" counts as unset. A flag on the command line overrides its variable, and a bad variable that a flag overrides is
// not an error. Values are checked here so errors name their source: addresses must be host:port, worker threads an
// integer in [0, 256], log level/format one of the listed words (case-insensitive; stored lowercase),
// the grace a non-negative finite duration.
// Errors (InvalidArgument, naming the flag or variable and the bad value): unknown flags, positional
// arguments, missing or empty values, a value given to --help/--version, bad values.
// With --help or --version, the remaining values are not parsed, so help works with a broken environment;
// unknown flags are still errors.
absl::StatusOr<ServerFlags> ParseServerFlags(int argc, const char* const* argv,
                                             const std::function<const char*(const char*)>& getenv_fn);

// The --help text: usage line, then every flag with its environment variable and default.
std::string ServerUsage();

// Flags override the file: grpc_address, metrics_address, worker_threads and the security and transport
// fields given.
void ApplyFlagsToConfig(const ServerFlags& flags, attnserve::v1::ServerConfig* config);

// The whole start-up path: flags.config_path's file (or the embedded default when empty), then
// ApplyFlagsToConfig, then ApplyDefaultsAndValidate. Validation errors are prefixed with the config's
// source ("PATH: " or "embedded default config: ").
absl::StatusOr<attnserve::v1::ServerConfig> BuildServerConfig(const ServerFlags& flags);

}  // namespace attnserve
