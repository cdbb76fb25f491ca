// Client strings in logs and messages: bounded, escaped; repeated lines rate-limited with a count.
#include "common/log_string.h"

#include <string>

#include "gtest/gtest.h"

namespace attnserve {
namespace {

TEST(BoundedForLogTest, KeepsPrintableAndEscapesTheRest) {
  EXPECT_EQ(BoundedForLog("layer-1.a_b"), "layer-1.a_b");
  EXPECT_EQ(BoundedForLog("a\nINFO forged line"), "a\\x0aINFO forged line");
  EXPECT_EQ(BoundedForLog(std::string("x\0y", 3)), "x\\x00y");
  EXPECT_EQ(BoundedForLog("\x1b[31mred"), "\\x1b[31mred");
  EXPECT_EQ(BoundedForLog("back\\slash"), "back\\x5cslash");  // no ambiguity with our own escapes
  EXPECT_EQ(BoundedForLog("\xc3\xa9"), "\\xc3\\xa9");
}

TEST(BoundedForLogTest, CutsLongStringsAndSaysHowLong) {
  const std::string huge(1 << 20, 'n');
  const std::string out = BoundedForLog(huge);
  EXPECT_EQ(out, std::string(128, 'n') + "...(1048576 bytes)");
  EXPECT_EQ(BoundedForLog("abcdef", 3), "abc...(6 bytes)");
  EXPECT_EQ(BoundedForLog("abc", 3), "abc");
}

TEST(LogRateLimiterTest, AllowsTheRateAndCountsWhatItDrops) {
  LogRateLimiter limiter(3);
  const absl::Time t0 = absl::FromUnixSeconds(1'700'000'000);
  int64_t dropped = -1;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(limiter.Allow(t0 + absl::Milliseconds(i), &dropped));
    EXPECT_EQ(dropped, 0);
  }
  for (int i = 0; i < 100; ++i) EXPECT_FALSE(limiter.Allow(t0 + absl::Milliseconds(10 + i), &dropped));
  ASSERT_TRUE(limiter.Allow(t0 + absl::Seconds(1), &dropped));  // a new window
  EXPECT_EQ(dropped, 100);
  ASSERT_TRUE(limiter.Allow(t0 + absl::Seconds(1), &dropped));
  EXPECT_EQ(dropped, 0);
}

}  // namespace
}  // namespace attnserve
