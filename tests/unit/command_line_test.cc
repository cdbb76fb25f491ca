// The shared command-line parser (common/command_line.h) and duration syntax (common/duration.h). The
// server's own flags on top of them are tested in server_config_test.cc.
#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "common/command_line.h"
#include "common/duration.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

// The message of a status that must be InvalidArgument.
template <typename T>
std::string ErrorOf(const absl::StatusOr<T>& result) {
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
  return std::string(result.status().message());
}

// ---------------------------------------------------------------------------------------------------
// ParseCommandLine: syntax.

const FlagSpec kSpecs[] = {{"seq", true}, {"json", false}, {"config", true, nullptr, "FILE"}};

TEST(ParseCommandLineTest, ParsesBothValueFormsSwitchesAndPositionals) {
  auto cl = ParseCommandLine({"infer", "--seq=4", "small", "--json", "--seq", "8", "-", ""}, kSpecs);
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_THAT(cl->positional, ElementsAre("infer", "small", "-", ""));
  EXPECT_EQ(cl->Get("seq"), "8") << "a repeated flag keeps its last value";
  EXPECT_EQ(cl->Find("seq")->source, "--seq");
  EXPECT_TRUE(cl->Has("json"));
  EXPECT_FALSE(cl->Has("config"));
  EXPECT_EQ(cl->Get("config"), std::nullopt);
  EXPECT_EQ(cl->Find("config"), nullptr);
}

TEST(ParseCommandLineTest, AValueMayStartWithOneDashAndHoldAnEqualsSign) {
  auto cl = ParseCommandLine({"--seq", "-5", "--config=a=b.pbtxt"}, kSpecs);
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_EQ(cl->Get("seq"), "-5");
  EXPECT_EQ(cl->Get("config"), "a=b.pbtxt");
}

TEST(ParseCommandLineTest, DashHIsHelpEvenWithoutAHelpSpec) {
  auto cl = ParseCommandLine({"-h"}, kSpecs);
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_TRUE(cl->Has("help"));
  EXPECT_THAT(cl->positional, IsEmpty());
}

TEST(ParseCommandLineTest, SyntaxErrorsNameTheFlag) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--seq"}, "--seq: missing value"},
      {{"--seq", "--json"}, "--seq: missing value"},  // a value never starts with "--"
      {{"--seq="}, "--seq: empty value"},
      {{"--seq", ""}, "--seq: empty value"},
      {{"--config"}, "--config: missing value (FILE)"},
      {{"--config="}, "--config: empty value (FILE)"},
      {{"--json=1"}, "--json takes no value"},
      {{"--nope"}, "unknown flag \"--nope\" (see --help)"},
      {{"--nope=3"}, "unknown flag \"--nope\" (see --help)"},
      {{"--help"}, "unknown flag \"--help\" (see --help)"},
      {{"-x"}, "unknown flag \"-x\"; flags start with -- (see --help)"},
      {{"--"}, "unknown flag \"--\"; flags start with -- (see --help)"},
      {{"infer", "--json", "-seq=4"}, "unknown flag \"-seq=4\"; flags start with -- (see --help)"},
  };
  for (const auto& [args, message] : cases) {
    EXPECT_EQ(ErrorOf(ParseCommandLine(args, kSpecs)), message) << absl::StrJoin(args, " ");
  }
}

// ---------------------------------------------------------------------------------------------------
// ParseCommandLine: environment variables.

class EnvironmentTest : public ::testing::Test {
 protected:
  static constexpr FlagSpec kEnvSpecs[] = {{"target", true, "T_TARGET"},
                                           {"timeout", true, "T_TIMEOUT"},
                                           {"plain", true},
                                           {"json", false, "T_JSON"}};

  absl::StatusOr<CommandLine> Parse(const std::vector<std::string>& args) {
    return ParseCommandLine(args, kEnvSpecs, [this](const char* name) -> const char* {
      read_.push_back(name);
      const auto it = env_.find(name);
      return it == env_.end() ? nullptr : it->second.c_str();
    });
  }

  std::map<std::string, std::string> env_;
  std::vector<std::string> read_;  // the variables looked up, in order
};

TEST_F(EnvironmentTest, AFlagNotGivenFallsBackToItsVariable) {
  env_ = {{"T_TARGET", "host:1"}, {"T_TIMEOUT", "5s"}, {"plain", "not a variable"}};
  auto cl = Parse({});
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_EQ(cl->Get("target"), "host:1");
  EXPECT_EQ(cl->Find("target")->source, "T_TARGET");
  EXPECT_EQ(cl->Get("timeout"), "5s");
  EXPECT_FALSE(cl->Has("plain")) << "no variable named";
  EXPECT_THAT(read_, ElementsAre("T_TARGET", "T_TIMEOUT")) << "switches have no variable";
}

TEST_F(EnvironmentTest, TheCommandLineOverridesAndItsVariableIsNotRead) {
  env_ = {{"T_TARGET", "host:1"}, {"T_TIMEOUT", "garbage"}};
  auto cl = Parse({"--timeout", "2s"});
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_EQ(cl->Get("timeout"), "2s");
  EXPECT_EQ(cl->Find("timeout")->source, "--timeout");
  EXPECT_EQ(cl->Get("target"), "host:1");
  EXPECT_THAT(read_, ElementsAre("T_TARGET"));
}

TEST_F(EnvironmentTest, AnEmptyVariableIsUnset) {
  env_ = {{"T_TARGET", ""}};
  auto cl = Parse({});
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_FALSE(cl->Has("target"));
}

TEST_F(EnvironmentTest, NoFunctionReadsNoVariable) {
  auto cl = ParseCommandLine({}, kEnvSpecs);
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_THAT(cl->values, IsEmpty());
  cl = ParseCommandLine({"--target=x:1"}, kEnvSpecs, GetenvFn());
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_EQ(cl->Get("target"), "x:1");
}

TEST_F(EnvironmentTest, ErrorsNameTheVariableOrTheFlag) {
  env_ = {{"T_TARGET", "nohost"}, {"T_TIMEOUT", "later"}};
  auto cl = Parse({});
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_EQ(BadFlagValue(*cl->Find("target"), "must be host:port"),
            absl::InvalidArgumentError("T_TARGET: must be host:port, got \"nohost\""));
  EXPECT_EQ(FlagError(*cl->Find("timeout"), ParseDuration(cl->Find("timeout")->text).status()),
            absl::InvalidArgumentError(
                "T_TIMEOUT: expected a duration such as \"10s\", \"500ms\", \"2m\" or seconds \"10\", got \"later\""));

  cl = Parse({"--timeout=-3s"});
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_EQ(FlagError(*cl->Find("timeout"), ParseDuration(cl->Find("timeout")->text).status()),
            absl::InvalidArgumentError("--timeout: must not be negative, got \"-3s\""));
  EXPECT_EQ(FlagError(*cl->Find("timeout"), absl::NotFoundError("x")), absl::NotFoundError("--timeout: x"))
      << "the code is kept";
}

// ---------------------------------------------------------------------------------------------------
// Conversions.

TEST(FlagConversionsTest, ValuesAndExactMessages) {
  EXPECT_EQ(*ParseIntFlag("batch", "8", 1, 8), 8);
  EXPECT_EQ(ErrorOf(ParseIntFlag("batch", "9", 1, 8)), "--batch: expected an integer in [1, 8], got \"9\"");
  EXPECT_EQ(ErrorOf(ParseIntFlag("batch", "2x", 1, 8)), "--batch: expected an integer in [1, 8], got \"2x\"");
  EXPECT_EQ(*ParsePositiveDoubleFlag("rate", "0.5"), 0.5);
  EXPECT_EQ(ErrorOf(ParsePositiveDoubleFlag("rate", "0")), "--rate: expected a positive number, got \"0\"");
  EXPECT_EQ(ErrorOf(ParsePositiveDoubleFlag("rate", "inf")), "--rate: expected a positive number, got \"inf\"");
  EXPECT_THAT(*ParseIntListFlag("concurrency", "1,4,16", 1, 64), ElementsAre(1, 4, 16));
  EXPECT_EQ(ErrorOf(ParseIntListFlag("concurrency", "1,,4", 1, 64)),
            "--concurrency: expected comma-separated integers in [1, 64], got \"1,,4\"");
  EXPECT_THAT(*ParsePositiveDoubleListFlag("rate", "100,250.5"), ElementsAre(100, 250.5));
  EXPECT_EQ(ErrorOf(ParsePositiveDoubleListFlag("rate", "1,-2")),
            "--rate: expected comma-separated positive numbers, got \"1,-2\"");
  EXPECT_EQ(*ParseDurationFlag("d", "1.5"), absl::Milliseconds(1500));
  EXPECT_EQ(*ParseDurationFlag("d", "250ms"), absl::Milliseconds(250));
  EXPECT_EQ(ErrorOf(ParseDurationFlag("d", "-1s")), "--d: must not be negative, got \"-1s\"");
  EXPECT_EQ(ErrorOf(ParseDurationFlag("d", "inf")), "--d: must be finite, got \"inf\"");
}

// ---------------------------------------------------------------------------------------------------
// ParseDuration.

TEST(ParseDurationTest, UnitsPlainSecondsAndZero) {
  const std::vector<std::pair<std::string, absl::Duration>> cases = {
      {"10s", absl::Seconds(10)},       {"500ms", absl::Milliseconds(500)}, {"2m", absl::Minutes(2)},
      {"10", absl::Seconds(10)},        {"1.5", absl::Milliseconds(1500)},  {"1m30s", absl::Seconds(90)},
      {"1h", absl::Hours(1)},           {"250us", absl::Microseconds(250)}, {"7ns", absl::Nanoseconds(7)},
      {"0", absl::ZeroDuration()},      {"0s", absl::ZeroDuration()},       {"-0", absl::ZeroDuration()},
      {"1.5h", absl::Minutes(90)},      {"0.001", absl::Milliseconds(1)},   {"1e3", absl::Seconds(1000)},
  };
  for (const auto& [text, expected] : cases) {
    absl::StatusOr<absl::Duration> d = ParseDuration(text);
    ASSERT_TRUE(d.ok()) << text << ": " << d.status();
    EXPECT_EQ(*d, expected) << text;
  }
}

// Random but reproducible: a fixed seed, and rng() % n (the distributions differ between libraries).
TEST(ParseDurationTest, RandomValuesInEveryForm) {
  std::mt19937_64 rng(20240601);
  for (int i = 0; i < 500; ++i) {
    const int64_t n = static_cast<int64_t>(rng() % 1'000'000);
    const std::pair<const char*, absl::Duration> units[] = {
        {"ns", absl::Nanoseconds(n)}, {"us", absl::Microseconds(n)}, {"ms", absl::Milliseconds(n)},
        {"s", absl::Seconds(n)},      {"m", absl::Minutes(n)},       {"h", absl::Hours(n)}};
    const auto& [unit, expected] = units[rng() % 6];
    EXPECT_EQ(*ParseDuration(absl::StrCat(n, unit)), expected) << n << unit;
    // Plain seconds with up to three decimals: n ms.
    EXPECT_EQ(*ParseDuration(absl::StrFormat("%d.%03d", n / 1000, n % 1000)), absl::Milliseconds(n)) << n;
    // What absl::FormatDuration writes ("1h2m3.000000004s"; the server's tests pass durations so) reads back.
    const absl::Duration d = absl::Nanoseconds(static_cast<int64_t>(rng() % (int64_t{1} << 50)));
    EXPECT_EQ(*ParseDuration(absl::FormatDuration(d)), d) << absl::FormatDuration(d);
  }
}

TEST(ParseDurationTest, ErrorsHaveExactMessages) {
  const std::string kNotADuration = "expected a duration such as \"10s\", \"500ms\", \"2m\" or seconds \"10\"";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"soon", kNotADuration},         {"30x", kNotADuration},         {"10 s", kNotADuration},
      {"", kNotADuration},             {"s", kNotADuration},           {"nan", kNotADuration},
      {"1.5.2", kNotADuration},        {"--5s", kNotADuration},        {"inf", "must be finite"},
      {"-inf", "must be finite"},      {"1e400", "must be finite"},    {"-5s", "must not be negative"},
      {"-1", "must not be negative"},  {"-0.001", "must not be negative"}, {"-1m30s", "must not be negative"},
  };
  for (const auto& [text, problem] : cases) {
    EXPECT_EQ(ErrorOf(ParseDuration(text)), absl::StrCat(problem, ", got \"", text, "\"")) << text;
  }
}

}  // namespace
}  // namespace attnserve
