#include "common/command_line.h"

#include <cmath>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/duration.h"

namespace attnserve {
namespace {

const FlagSpec* FindSpec(absl::Span<const FlagSpec> specs, absl::string_view name) {
  for (const FlagSpec& spec : specs) {
    if (name == spec.name) return &spec;
  }
  return nullptr;
}

// `--name: PROBLEM (VALUE_NAME)`, so "missing value" says what kind of value.
absl::Status ValueSyntaxError(const FlagSpec& spec, absl::string_view problem) {
  std::string message = absl::StrCat("--", spec.name, ": ", problem);
  if (spec.value_name != nullptr) absl::StrAppend(&message, " (", spec.value_name, ")");
  return absl::InvalidArgumentError(message);
}

// Fills the values the command line did not give from their variables.
void ReadEnvironment(absl::Span<const FlagSpec> specs, const GetenvFn& getenv_fn, CommandLine* out) {
  if (!getenv_fn) return;
  for (const FlagSpec& spec : specs) {
    if (spec.env == nullptr || !spec.takes_value || out->values.count(spec.name) > 0) continue;
    const char* value = getenv_fn(spec.env);
    if (value != nullptr && value[0] != '\0') out->values[spec.name] = FlagValue{value, spec.env};
  }
}

absl::Status Bad(const std::string& name, const std::string& expected, const std::string& text) {
  return BadFlagValue(FlagValue{text, absl::StrCat("--", name)}, absl::StrCat("expected ", expected));
}

}  // namespace

std::optional<std::string> CommandLine::Get(const std::string& name) const {
  const FlagValue* value = Find(name);
  if (value == nullptr) return std::nullopt;
  return value->text;
}

const FlagValue* CommandLine::Find(const std::string& name) const {
  auto it = values.find(name);
  return it == values.end() ? nullptr : &it->second;
}

absl::StatusOr<CommandLine> ParseCommandLine(const std::vector<std::string>& args, absl::Span<const FlagSpec> specs,
                                             const GetenvFn& getenv_fn) {
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
    const FlagSpec* spec = FindSpec(specs, name);
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
      // A following "--x" is the next flag, not this one's value: `--config --worker-threads 2`.
      if (i + 1 >= args.size() || args[i + 1].compare(0, 2, "--") == 0) return ValueSyntaxError(*spec, "missing value");
      value = args[++i];
    }
    if (value.empty()) return ValueSyntaxError(*spec, "empty value");
    out.values[name] = FlagValue{std::move(value), absl::StrCat("--", name)};
  }
  ReadEnvironment(specs, getenv_fn, &out);
  return out;
}

absl::Status BadFlagValue(const FlagValue& value, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat(value.source, ": ", problem, ", got \"", value.text, "\""));
}

absl::Status FlagError(const FlagValue& value, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat(value.source, ": ", status.message()));
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
  absl::StatusOr<absl::Duration> d = ParseDuration(text);
  if (!d.ok()) return FlagError(FlagValue{text, absl::StrCat("--", name)}, d.status());
  return d;
}

}  // namespace attnserve
