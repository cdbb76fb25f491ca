// The command-line parsing that attnctl and attnbench share: `--name=value` or `--name value`, boolean
// switches, positional arguments anywhere, and value conversions whose errors name the flag.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace attnserve {

struct FlagSpec {
  const char* name;  // without the leading "--"
  bool takes_value;
};

struct CommandLine {
  std::vector<std::string> positional;
  std::map<std::string, std::string> values;  // a repeated flag keeps its last value
  std::set<std::string> switches;             // "-h" is recorded as "help"

  bool Has(const std::string& name) const { return values.count(name) > 0 || switches.count(name) > 0; }
  std::optional<std::string> Get(const std::string& name) const;
};

// `args` excludes the program name. InvalidArgument for unknown flags, a missing or empty value, or a value
// given to a switch. A value never starts with "--" (`--seq --batch 2` is an error, not seq="--batch").
absl::StatusOr<CommandLine> ParseCommandLine(const std::vector<std::string>& args, absl::Span<const FlagSpec> specs);

// Conversions of a flag's text; errors read "--name: expected ..., got "text"".
absl::StatusOr<int64_t> ParseIntFlag(const std::string& name, const std::string& text, int64_t min, int64_t max);
absl::StatusOr<double> ParsePositiveDoubleFlag(const std::string& name, const std::string& text);
// Comma-separated integers, each in [min, max], e.g. "1,4,16,64".
absl::StatusOr<std::vector<int64_t>> ParseIntListFlag(const std::string& name, const std::string& text, int64_t min,
                                                      int64_t max);
// Comma-separated positive numbers, e.g. "100,250.5".
absl::StatusOr<std::vector<double>> ParsePositiveDoubleListFlag(const std::string& name, const std::string& text);
// "10s", "500ms", "2m", or plain seconds "10"; must be finite and >= 0.
absl::StatusOr<absl::Duration> ParseDurationFlag(const std::string& name, const std::string& text);

}  // namespace attnserve
