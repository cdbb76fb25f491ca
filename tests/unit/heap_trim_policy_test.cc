// HeapTrimPolicy: growth and idle trims in virtual time. What they bound in the server is measured by
// hostile_test (a CONTINUATION flood after a reconnecting rapid reset).
#include "server/runtime/heap_trim_policy.h"

#include <memory>

#include "gtest/gtest.h"

namespace attnserve {
namespace {

using Trim = HeapTrimPolicy::Trim;
constexpr int64_t kMiB = int64_t{1} << 20;
const absl::Time kStart = absl::FromUnixSeconds(1'000'000);

std::unique_ptr<HeapTrimPolicy> MakePolicy(int64_t growth_trim_bytes = 32 * kMiB) {
  HeapTrimPolicy::Options options;
  options.growth_trim_bytes = growth_trim_bytes;
  options.idle_interval = absl::Seconds(1);
  auto policy = HeapTrimPolicy::Create(options);
  EXPECT_TRUE(policy.ok()) << policy.status();
  return *std::move(policy);
}

TEST(HeapTrimPolicyTest, CreateNamesTheOptionOutOfRange) {
  HeapTrimPolicy::Options options;
  options.growth_trim_bytes = 0;
  auto policy = HeapTrimPolicy::Create(options);
  ASSERT_FALSE(policy.ok());
  EXPECT_NE(policy.status().message().find("growth_trim_bytes: must be > 0, got 0"), std::string::npos);
  options = {};
  options.idle_interval = absl::ZeroDuration();
  policy = HeapTrimPolicy::Create(options);
  ASSERT_FALSE(policy.ok());
  EXPECT_NE(policy.status().message().find("idle_interval"), std::string::npos);
}

TEST(HeapTrimPolicyTest, GrowthFromTheLowestSinceTheLastTrimTrimsWithRequestsInFlight) {
  auto policy = MakePolicy();
  absl::Time t = kStart;
  EXPECT_EQ(policy->Check(t, 100 * kMiB, true, false), Trim::kNone);
  EXPECT_EQ(policy->Check(t += absl::Milliseconds(50), 131 * kMiB, true, false), Trim::kNone);
  EXPECT_EQ(policy->Check(t += absl::Milliseconds(50), 90 * kMiB, true, false), Trim::kNone);  // a dip
  EXPECT_EQ(policy->Check(t += absl::Milliseconds(50), 121 * kMiB, true, false), Trim::kNone);
  EXPECT_EQ(policy->Check(t += absl::Milliseconds(50), 122 * kMiB, true, false), Trim::kGrowth);  // 90 + 32
  policy->Trimmed(t, 110 * kMiB);  // what the trim left is the new lowest
  EXPECT_EQ(policy->Check(t += absl::Milliseconds(50), 141 * kMiB, true, false), Trim::kNone);
  EXPECT_EQ(policy->Check(t += absl::Milliseconds(50), 142 * kMiB, true, false), Trim::kGrowth);
  policy->Trimmed(t, 142 * kMiB);  // live memory: nothing to give back; the next trim waits for 32 MiB more
  EXPECT_EQ(policy->Check(t += absl::Milliseconds(50), 150 * kMiB, true, false), Trim::kNone);
}

TEST(HeapTrimPolicyTest, IdleTrimsOncePerIntervalWhileNoRequestHoldsMemory) {
  auto policy = MakePolicy();
  absl::Time t = kStart;
  EXPECT_EQ(policy->Check(t, 100 * kMiB, false, false), Trim::kIdle);  // never trimmed yet
  policy->Trimmed(t, 100 * kMiB);
  EXPECT_EQ(policy->Check(t + absl::Milliseconds(999), 100 * kMiB, false, false), Trim::kNone);
  EXPECT_EQ(policy->Check(t + absl::Seconds(1), 100 * kMiB, true, false), Trim::kNone);  // a request holds memory
  EXPECT_EQ(policy->Check(t + absl::Seconds(1), 100 * kMiB, false, false), Trim::kIdle);
  policy->Trimmed(t + absl::Seconds(1), 100 * kMiB);
  // A growth trim counts as the last trim too.
  EXPECT_EQ(policy->Check(t + absl::Milliseconds(1500), 140 * kMiB, false, false), Trim::kGrowth);
  policy->Trimmed(t + absl::Milliseconds(1500), 100 * kMiB);
  EXPECT_EQ(policy->Check(t + absl::Milliseconds(2499), 100 * kMiB, false, false), Trim::kNone);
  EXPECT_EQ(policy->Check(t + absl::Milliseconds(2500), 100 * kMiB, false, false), Trim::kIdle);
}

TEST(HeapTrimPolicyTest, NothingWhileLayersLoadAndTheirGrowthIsNotCounted) {
  auto policy = MakePolicy();
  absl::Time t = kStart;
  policy->Trimmed(t, 100 * kMiB);
  EXPECT_EQ(policy->Check(t += absl::Seconds(2), 300 * kMiB, false, true), Trim::kNone);  // both would be due
  EXPECT_EQ(policy->Check(t += absl::Milliseconds(50), 310 * kMiB, true, false), Trim::kNone);  // from 300
  EXPECT_EQ(policy->Check(t += absl::Milliseconds(50), 332 * kMiB, true, false), Trim::kGrowth);
}

TEST(HeapTrimPolicyTest, AnUnreadableRssMakesNoGrowthTrim) {
  auto policy = MakePolicy();
  absl::Time t = kStart;
  EXPECT_EQ(policy->Check(t, 100 * kMiB, true, false), Trim::kNone);
  EXPECT_EQ(policy->Check(t += absl::Milliseconds(50), -1, true, false), Trim::kNone);
  EXPECT_EQ(policy->Check(t += absl::Milliseconds(50), -1, false, false), Trim::kIdle);
  policy->Trimmed(t, -1);
  EXPECT_EQ(policy->Check(t += absl::Milliseconds(50), 400 * kMiB, true, false), Trim::kNone);  // the new lowest
}

TEST(HeapTrimPolicyTest, GrowthStepIsAnEighthOfTheBudgetAtLeast16MiB) {
  EXPECT_EQ(HeapGrowthTrimBytes(256 * kMiB), 32 * kMiB);
  EXPECT_EQ(HeapGrowthTrimBytes(int64_t{12} << 30), int64_t{1536} * kMiB);
  EXPECT_EQ(HeapGrowthTrimBytes(64 * kMiB), 16 * kMiB);
  EXPECT_EQ(HeapGrowthTrimBytes(0), 16 * kMiB);
}

}  // namespace
}  // namespace attnserve
