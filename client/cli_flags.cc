#include "client/cli_flags.h"

#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/status_macros.h"

namespace attnserve {
namespace {

absl::Status Bad(const std::string& name, const std::string& expected, const std::string& text) {
  return absl::InvalidArgumentError(absl::StrCat("--", name, ": expected ", expected, ", got \"", text, "\""));
}

}  // namespace

std::optional<std::string> CommandLine::Get(const std::string& name) const {
  auto it = values.find(name);
  if (it == values.end()) return std::nullopt;
  return it->second;
}

absl::StatusOr<CommandLine> ParseCommandLine(const std::vector<std::string>& args, absl::Span<const FlagSpec> specs) {
  CommandLine out;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "-h") {
      out.switches.insert("help");
      continue;
    }
    if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) {
      if (!arg.empty() && arg[0] == '-' && arg != "-") {
        return absl::InvalidArgumentError(absl::StrCat("unknown flag \"", arg, "\"; flags start with -- (see --help)"));
      }
      out.positional.push_back(arg);
      continue;
    }
    const size_t eq = arg.find('=');
    const std::string name = arg.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
    const FlagSpec* spec = nullptr;
    for (const FlagSpec& s : specs) {
      if (name == s.name) spec = &s;
    }
    if (spec == nullptr) return absl::InvalidArgumentError(absl::StrCat("unknown flag \"--", name, "\" (see --help)"));
    if (!spec->takes_value) {
      if (eq != std::string::npos) return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
      out.switches.insert(name);
      continue;
    }
    std::string value;
    if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
    } else {
      if (i + 1 >= args.size() || args[i + 1].compare(0, 2, "--") == 0) {
        return absl::InvalidArgumentError(absl::StrCat("--", name, ": missing value"));
      }
      value = args[++i];
    }
    if (value.empty()) return absl::InvalidArgumentError(absl::StrCat("--", name, ": empty value"));
    out.values[name] = value;
  }
  return out;
}

absl::StatusOr<int64_t> ParseIntFlag(const std::string& name, const std::string& text, int64_t min, int64_t max) {
  int64_t v = 0;
  if (!absl::SimpleAtoi(text, &v) || v < min || v > max) {
    return Bad(name, absl::StrCat("an integer in [", min, ", ", max, "]"), text);
  }
  return v;
}

absl::StatusOr<double> ParsePositiveDoubleFlag(const std::string& name, const std::string& text) {
  double v = 0;
  if (!absl::SimpleAtod(text, &v) || !std::isfinite(v) || v <= 0) return Bad(name, "a positive number", text);
  return v;
}

absl::StatusOr<std::vector<int64_t>> ParseIntListFlag(const std::string& name, const std::string& text, int64_t min,
                                                      int64_t max) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(part, &v) || v < min || v > max) {
      return Bad(name, absl::StrCat("comma-separated integers in [", min, ", ", max, "]"), text);
    }
    out.push_back(v);
  }
  return out;
}

absl::StatusOr<std::vector<double>> ParsePositiveDoubleListFlag(const std::string& name, const std::string& text) {
  std::vector<double> out;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    double v = 0;
    if (!absl::SimpleAtod(part, &v) || !std::isfinite(v) || v <= 0) {
      return Bad(name, "comma-separated positive numbers", text);
    }
    out.push_back(v);
  }
  return out;
}

absl::StatusOr<absl::Duration> ParseDurationFlag(const std::string& name, const std::string& text) {
  constexpr char kExpected[] = "a duration such as \"10s\", \"500ms\", \"2m\" or seconds \"10\"";
  absl::Duration d;
  double seconds = 0;
  // Plain numbers are seconds; absl::ParseDuration wants a unit on anything but "0".
  if (absl::SimpleAtod(text, &seconds)) {
    if (!std::isfinite(seconds)) return Bad(name, kExpected, text);
    d = absl::Seconds(seconds);
  } else if (!absl::ParseDuration(text, &d)) {
    return Bad(name, kExpected, text);
  }
  if (d == absl::InfiniteDuration() || d < absl::ZeroDuration()) return Bad(name, "a finite, non-negative duration", text);
  return d;
}

}  // namespace attnserve
