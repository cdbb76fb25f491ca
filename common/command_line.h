// The command-line parsing of attnserve, attnctl and attnbench: `--name=value` or `--name value`, switches,
// positional arguments anywhere, environment-variable fallbacks, and value conversions whose errors name
// where the value came from.
//
// Not absl::flags: its flags live in one process-wide registry, so the server's and the tools' flags would
// collide in a test binary that links both, and it reads the real environment with no way to inject one.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace attnserve {

struct FlagSpec {
  const char* name;  // without the leading "--"
  bool takes_value;
  const char* env = nullptr;         // value flags only: the variable read when the flag is not given
  const char* value_name = nullptr;  // e.g. "FILE", shown in missing/empty-value errors
};

// A value flag's text and where it came from.
struct FlagValue {
  std::string text;
  std::string source;  // "--name", or the environment variable's name
};

struct CommandLine {
  std::vector<std::string> positional;
  std::map<std::string, FlagValue> values;  // by flag name; a repeated flag keeps its last value
  std::set<std::string> switches;           // "-h" is recorded as "help"

  bool Has(const std::string& name) const { return values.count(name) > 0 || switches.count(name) > 0; }
  std::optional<std::string> Get(const std::string& name) const;
  const FlagValue* Find(const std::string& name) const;  // nullptr when absent
};

// Looks a variable up; nullptr when unset. std::getenv, or a fake in tests.
using GetenvFn = std::function<const char*(const char*)>;

// `args` excludes the program name. A value flag not on the command line falls back to its `env` variable,
// read through `getenv_fn` (an empty function reads none); a variable set to "" counts as unset. A flag on
// the command line overrides its variable, which is then not even read: a bad variable so overridden is no
// error.
// InvalidArgument for unknown flags, a missing or empty value, or a value given to a switch. A value never
// starts with "--" (`--seq --batch 2` is an error, not seq="--batch"). Values are not checked here, so a
// caller can look at --help before any of them; convert them with the functions below or report a bad one
// with BadFlagValue / FlagError.
absl::StatusOr<CommandLine> ParseCommandLine(const std::vector<std::string>& args, absl::Span<const FlagSpec> specs,
                                             const GetenvFn& getenv_fn = {});

// InvalidArgument `SOURCE: PROBLEM, got "TEXT"`, e.g. `ATTNSERVE_LOG_LEVEL: expected one of a|b, got "c"`.
absl::Status BadFlagValue(const FlagValue& value, absl::string_view problem);
// `status` (not OK) with its message prefixed by `SOURCE: `, for checks whose messages quote the text
// themselves (ParseDuration, host:port).
absl::Status FlagError(const FlagValue& value, const absl::Status& status);

// Conversions of a command-line flag's text; errors read `--name: expected ..., got "text"`.
absl::StatusOr<int64_t> ParseIntFlag(const std::string& name, const std::string& text, int64_t min, int64_t max);
absl::StatusOr<double> ParsePositiveDoubleFlag(const std::string& name, const std::string& text);
// Comma-separated integers, each in [min, max], e.g. "1,4,16,64".
absl::StatusOr<std::vector<int64_t>> ParseIntListFlag(const std::string& name, const std::string& text, int64_t min,
                                                      int64_t max);
// Comma-separated positive numbers, e.g. "100,250.5".
absl::StatusOr<std::vector<double>> ParsePositiveDoubleListFlag(const std::string& name, const std::string& text);
// ParseDuration (common/duration.h) with the flag named: `--name: must not be negative, got "-1s"`.
absl::StatusOr<absl::Duration> ParseDurationFlag(const std::string& name, const std::string& text);

}  // namespace attnserve
