#include "server/server_flags.h"

#include <cmath>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "core/status_macros.h"
#include "server/server_config.h"

namespace attnserve {
namespace {

// Where a raw value came from; `source` ("--config" or "ATTNSERVE_CONFIG") names it in errors.
struct RawValue {
  std::string value;
  std::string source;
};

using Setter = absl::Status (*)(const RawValue&, ServerFlags*);

struct FlagSpec {
  const char* name;  // without the leading "--"
  const char* env;
  const char* value_name;
  const char* default_text;
  const char* help;
  Setter set;
};

absl::Status BadValue(const RawValue& raw, absl::string_view expected) {
  return absl::InvalidArgumentError(absl::StrCat(raw.source, ": ", expected, ", got \"", raw.value, "\""));
}

absl::Status SetConfig(const RawValue& raw, ServerFlags* f) {
  f->config_path = raw.value;
  return absl::OkStatus();
}

absl::Status SetAddress(const RawValue& raw, std::optional<std::string>* out) {
  const absl::Status status = CheckHostPort(raw.value);
  if (!status.ok()) return absl::InvalidArgumentError(absl::StrCat(raw.source, ": ", status.message()));
  *out = raw.value;
  return absl::OkStatus();
}
absl::Status SetGrpcAddress(const RawValue& raw, ServerFlags* f) { return SetAddress(raw, &f->grpc_address); }
absl::Status SetMetricsAddress(const RawValue& raw, ServerFlags* f) {
  return SetAddress(raw, &f->metrics_address);
}

absl::Status SetWorkerThreads(const RawValue& raw, ServerFlags* f) {
  int32_t n = 0;
  if (!absl::SimpleAtoi(raw.value, &n)) return BadValue(raw, "expected an integer");
  // Checked here too: 0 would otherwise be taken by the config as "unset" and silently become 1.
  if (n < kMinWorkerThreads || n > kMaxWorkerThreads) {
    return BadValue(raw, absl::StrCat("must be between ", kMinWorkerThreads, " and ", kMaxWorkerThreads));
  }
  f->worker_threads = n;
  return absl::OkStatus();
}

absl::Status SetOneOf(const RawValue& raw, const std::vector<std::string>& allowed, std::string* out) {
  const std::string lower = absl::AsciiStrToLower(raw.value);
  for (const std::string& a : allowed) {
    if (lower == a) {
      *out = lower;
      return absl::OkStatus();
    }
  }
  return BadValue(raw, absl::StrCat("expected one of ", absl::StrJoin(allowed, "|")));
}
absl::Status SetLogLevel(const RawValue& raw, ServerFlags* f) {
  return SetOneOf(raw, {"trace", "debug", "info", "warn", "error", "off"}, &f->log_level);
}
absl::Status SetLogFormat(const RawValue& raw, ServerFlags* f) {
  return SetOneOf(raw, {"text", "json"}, &f->log_format);
}

absl::Status SetShutdownGrace(const RawValue& raw, ServerFlags* f) {
  constexpr absl::string_view kExpected = "expected a duration such as \"30s\", \"500ms\", \"2m\" or seconds \"30\"";
  absl::Duration d;
  double seconds = 0;
  // Plain numbers are seconds; absl::ParseDuration wants a unit on anything but "0".
  if (absl::SimpleAtod(raw.value, &seconds)) {
    if (!std::isfinite(seconds)) return BadValue(raw, kExpected);
    d = absl::Seconds(seconds);
  } else if (!absl::ParseDuration(raw.value, &d)) {
    return BadValue(raw, kExpected);
  }
  if (d == absl::InfiniteDuration() || d == -absl::InfiniteDuration()) {
    return BadValue(raw, "must be finite");
  }
  if (d < absl::ZeroDuration()) return BadValue(raw, "must not be negative");
  f->shutdown_grace = d;
  return absl::OkStatus();
}

// The value flags, in --help order.
const std::vector<FlagSpec>& Specs() {
  static const auto* specs = new std::vector<FlagSpec>{
      {"config", "ATTNSERVE_CONFIG", "FILE", "(embedded: small + base layers)",
       "Config file: .pbtxt/.textproto/.txtpb (protobuf text) or .json.", &SetConfig},
      {"grpc-address", "ATTNSERVE_GRPC_ADDRESS", "HOST:PORT", kDefaultGrpcAddress,
       "gRPC listen address; overrides the config's grpc_address. Port 0 picks a free port.", &SetGrpcAddress},
      {"metrics-address", "ATTNSERVE_METRICS_ADDRESS", "HOST:PORT", kDefaultMetricsAddress,
       "Prometheus /metrics listen address; overrides the config's metrics_address.", &SetMetricsAddress},
      {"worker-threads", "ATTNSERVE_WORKER_THREADS", "N", "1",
       "Threads computing batches (1-256); overrides the config's worker_threads.", &SetWorkerThreads},
      {"log-level", "ATTNSERVE_LOG_LEVEL", "LEVEL", "info", "Log level: trace|debug|info|warn|error|off.",
       &SetLogLevel},
      {"log-format", "ATTNSERVE_LOG_FORMAT", "FORMAT", "text", "Log line format: text|json.",
       &SetLogFormat},
      {"shutdown-grace", "ATTNSERVE_SHUTDOWN_GRACE", "DURATION", "30s",
       "On shutdown, how long in-flight requests may finish: \"30s\", \"500ms\", \"2m\" or seconds.",
       &SetShutdownGrace},
  };
  return *specs;
}

const FlagSpec* FindSpec(std::string_view name) {
  for (const FlagSpec& spec : Specs()) {
    if (name == spec.name) return &spec;
  }
  return nullptr;
}

}  // namespace

absl::StatusOr<ServerFlags> ParseServerFlags(int argc, const char* const* argv,
                                             const std::function<const char*(const char*)>& getenv_fn) {
  ServerFlags flags;
  // Raw values by spec index; the environment first, so the command line overwrites it.
  std::vector<std::optional<RawValue>> raw(Specs().size());
  if (getenv_fn) {
    for (size_t i = 0; i < Specs().size(); ++i) {
      const char* value = getenv_fn(Specs()[i].env);
      if (value != nullptr && value[0] != '\0') raw[i] = RawValue{value, Specs()[i].env};
    }
  }

  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i] == nullptr ? "" : argv[i];
    if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) {
      if (arg == "-h") {
        flags.help = true;
        continue;
      }
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected argument \"", arg, "\"; flags start with -- (see --help)"));
    }
    const size_t eq = arg.find('=');
    const std::string name = arg.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
    if (name == "help" || name == "version") {
      if (eq != std::string::npos) return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
      (name == "help" ? flags.help : flags.version) = true;
      continue;
    }
    const FlagSpec* spec = FindSpec(name);
    if (spec == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag \"--", name, "\" (see --help)"));
    }
    const size_t index = static_cast<size_t>(spec - Specs().data());
    std::string value;
    if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
    } else {
      // A following "--x" is the next flag, not this one's value: `--config --worker-threads 2`.
      if (i + 1 >= argc || argv[i + 1] == nullptr || std::string_view(argv[i + 1]).substr(0, 2) == "--") {
        return absl::InvalidArgumentError(absl::StrCat("--", name, ": missing value (", spec->value_name, ")"));
      }
      value = argv[++i];
    }
    if (value.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, ": empty value (", spec->value_name, ")"));
    }
    raw[index] = RawValue{std::move(value), absl::StrCat("--", name)};
  }
  if (flags.help || flags.version) return flags;

  for (size_t i = 0; i < Specs().size(); ++i) {
    if (raw[i].has_value()) RETURN_IF_ERROR(Specs()[i].set(*raw[i], &flags));
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
  for (const FlagSpec& spec : Specs()) {
    absl::StrAppend(&out, "  --", spec.name, " ", spec.value_name, "\n", "      ", spec.help, "\n",
                    "      env: ", spec.env, "    default: ", spec.default_text, "\n");
  }
  absl::StrAppend(&out,
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
}

absl::StatusOr<attnserve::v1::ServerConfig> BuildServerConfig(const ServerFlags& flags) {
  attnserve::v1::ServerConfig config;
  std::string source;
  if (flags.config_path.empty()) {
    config = DefaultServerConfig();
    source = "embedded default config";
  } else {
    ASSIGN_OR_RETURN(config, LoadServerConfigFile(flags.config_path));  // errors already name the path
    source = flags.config_path;
  }
  ApplyFlagsToConfig(flags, &config);
  const absl::Status status = ApplyDefaultsAndValidate(&config);
  if (!status.ok()) return absl::Status(status.code(), absl::StrCat(source, ": ", status.message()));
  return config;
}

}  // namespace attnserve
