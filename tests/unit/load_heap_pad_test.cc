// LoadHeapPad: the top pad is raised while loads run and put back `hold` after the last one (a fake clock and
// recorded allocator calls); and, with glibc's real allocator, memory freed on the load thread stays resident
// while the pad is raised and goes back to the system when it is released.
#include "server/runtime/load_heap_pad.h"

#include <malloc.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/config.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/runtime/background_priority.h"
#include "tests/testing/fake_clock.h"

namespace attnserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

struct Recorded {
  std::vector<std::pair<int64_t, int64_t>> tunings;  // top pad, mmap threshold
  int give_backs = 0;
};

constexpr std::pair<int64_t, int64_t> kRaised{32 << 20, 16 << 20};
constexpr std::pair<int64_t, int64_t> kNormal{LoadHeapPad::kDefaultTopPadBytes, 1 << 20};

std::unique_ptr<LoadHeapPad> MakePad(testing::FakeClock* clock, Recorded* calls, int64_t pad_bytes = 32 << 20) {
  LoadHeapPad::Options options;
  options.pad_bytes = pad_bytes;
  options.load_mmap_threshold_bytes = 16 << 20;
  options.mmap_threshold_bytes = 1 << 20;
  options.hold = absl::Seconds(5);
  options.clock = clock;
  options.tune_malloc = [calls](int64_t pad, int64_t threshold) { calls->tunings.emplace_back(pad, threshold); };
  options.give_back = [calls] { ++calls->give_backs; };
  auto pad = LoadHeapPad::Create(std::move(options));
  EXPECT_TRUE(pad.ok()) << pad.status();
  return *std::move(pad);
}

// The policy in virtual time, with the allocator calls recorded.
class LoadHeapPadPolicyTest : public ::testing::Test {
 protected:
  testing::FakeClock clock;
  Recorded calls;
};

TEST_F(LoadHeapPadPolicyTest, RaisedForALoadAndReleasedHoldAfterItEnds) {
  auto pad = MakePad(&clock, &calls);
  EXPECT_FALSE(pad->ReleaseIfIdle());  // nothing raised yet
  {
    auto load = pad->LoadStarting();
    EXPECT_TRUE(pad->raised());
    clock.Advance(absl::Seconds(50));  // a long load: never released under it
    EXPECT_FALSE(pad->ReleaseIfIdle());
  }
  clock.Advance(absl::Milliseconds(4999));
  EXPECT_FALSE(pad->ReleaseIfIdle());
  EXPECT_THAT(calls.tunings, ElementsAre(kRaised));
  clock.Advance(absl::Milliseconds(1));
  EXPECT_TRUE(pad->ReleaseIfIdle());
  EXPECT_FALSE(pad->raised());
  EXPECT_THAT(calls.tunings, ElementsAre(kRaised, kNormal));
  EXPECT_EQ(calls.give_backs, 1);
  clock.Advance(absl::Seconds(60));
  EXPECT_FALSE(pad->ReleaseIfIdle());  // once per raise
  EXPECT_EQ(calls.give_backs, 1);
}

TEST_F(LoadHeapPadPolicyTest, BackToBackLoadsKeepOnePadUntilTheLastEnds) {
  auto pad = MakePad(&clock, &calls);
  auto first = pad->LoadStarting();
  auto second = pad->LoadStarting();  // overlapping: another layer's load
  first.reset();
  clock.Advance(absl::Seconds(10));
  EXPECT_FALSE(pad->ReleaseIfIdle());  // the second still runs
  second.reset();
  clock.Advance(absl::Seconds(3));
  {
    auto third = pad->LoadStarting();  // within the hold: the pad is still up, not raised again
  }
  clock.Advance(absl::Seconds(3));
  EXPECT_FALSE(pad->ReleaseIfIdle());  // the hold counts from the third's end
  clock.Advance(absl::Seconds(2));
  EXPECT_TRUE(pad->ReleaseIfIdle());
  EXPECT_THAT(calls.tunings, ElementsAre(kRaised, kNormal));
  auto again = pad->LoadStarting();  // a later load raises it again
  EXPECT_THAT(calls.tunings, ElementsAre(kRaised, kNormal, kRaised));
}

TEST_F(LoadHeapPadPolicyTest, LoadsComingEveryFewSecondsDoNotKeepItUpPastMaxRaised) {
  auto pad = MakePad(&clock, &calls);  // hold 5 s, max_raised 60 s
  for (int i = 0; i < 20; ++i) {
    { auto load = pad->LoadStarting(); }
    clock.Advance(absl::Seconds(4));
    EXPECT_EQ(pad->ReleaseIfIdle(), i == 14) << "after " << 4 * (i + 1) << " s";  // 60 s after the raise
  }
  EXPECT_THAT(calls.tunings, ElementsAre(kRaised, kNormal, kRaised));
  EXPECT_EQ(calls.give_backs, 1);
}

TEST_F(LoadHeapPadPolicyTest, DestroyedRaisedPutsTheAllocatorBack) {
  {
    auto pad = MakePad(&clock, &calls);
    auto load = pad->LoadStarting();
  }
  EXPECT_THAT(calls.tunings, ElementsAre(kRaised, kNormal));
  EXPECT_EQ(calls.give_backs, 0);
}

TEST(LoadHeapPadTest, GiveBackSkipsTheLoadThreadWhileItIsBusy) {
  absl::Notification work_started, let_work_end, gave_back;
  std::thread load([&] {
    ASSERT_TRUE(RunAtBackgroundPriority([&] {
                  work_started.Notify();
                  let_work_end.WaitForNotification();
                  return absl::OkStatus();
                }).ok());
  });
  work_started.WaitForNotification();
  std::thread trimmer([&] {
    GiveBackHeapTops();  // must not wait for the load
    gave_back.Notify();
  });
  EXPECT_TRUE(gave_back.WaitForNotificationWithTimeout(absl::Seconds(30)));
  let_work_end.Notify();
  trimmer.join();
  load.join();
}

TEST_F(LoadHeapPadPolicyTest, ZeroPadMakesNoAllocatorCall) {
  auto pad = MakePad(&clock, &calls, /*pad_bytes=*/0);
  { auto load = pad->LoadStarting(); }
  clock.Advance(absl::Seconds(10));
  EXPECT_FALSE(pad->ReleaseIfIdle());
  EXPECT_TRUE(calls.tunings.empty());
  EXPECT_EQ(calls.give_backs, 0);
}

TEST(LoadHeapPadTest, CreateRefusesOptionsOutOfRangeNamingThem) {
  testing::FakeClock clock;
  for (int64_t bytes : {int64_t{1}, int64_t{4096}, (int64_t{1} << 30) + 1, int64_t{-1}}) {
    LoadHeapPad::Options options;
    options.pad_bytes = bytes;
    options.clock = &clock;
    auto pad = LoadHeapPad::Create(std::move(options));
    ASSERT_FALSE(pad.ok()) << bytes;
    EXPECT_EQ(pad.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(pad.status().message(), HasSubstr("pad_bytes"));
    EXPECT_THAT(pad.status().message(), HasSubstr("got " + std::to_string(bytes)));
  }
  for (int64_t threshold : {int64_t{512} << 10, (int64_t{32} << 20) + 1}) {
    LoadHeapPad::Options options;
    options.load_mmap_threshold_bytes = threshold;
    options.clock = &clock;
    auto pad = LoadHeapPad::Create(std::move(options));
    ASSERT_FALSE(pad.ok()) << threshold;
    EXPECT_THAT(pad.status().message(), HasSubstr("load_mmap_threshold_bytes"));
    EXPECT_THAT(pad.status().message(), HasSubstr("got " + std::to_string(threshold)));
  }
  for (int64_t threshold : {int64_t{256} << 10, (int64_t{32} << 20) + 1}) {
    LoadHeapPad::Options options;
    options.mmap_threshold_bytes = threshold;
    options.clock = &clock;
    EXPECT_THAT(LoadHeapPad::Create(std::move(options)).status().message(),
                HasSubstr("mmap_threshold_bytes must be in [524288, 33554432], got " + std::to_string(threshold)));
  }
  LoadHeapPad::Options hold_past_max;
  hold_past_max.hold = absl::Seconds(61);
  hold_past_max.clock = &clock;
  EXPECT_THAT(LoadHeapPad::Create(std::move(hold_past_max)).status().message(), HasSubstr("max_raised"));
  LoadHeapPad::Options negative_hold;
  negative_hold.hold = absl::Seconds(-1);
  negative_hold.clock = &clock;
  EXPECT_THAT(LoadHeapPad::Create(std::move(negative_hold)).status().message(), HasSubstr("hold"));
  LoadHeapPad::Options no_clock;
  no_clock.clock = nullptr;
  EXPECT_THAT(LoadHeapPad::Create(std::move(no_clock)).status().message(), HasSubstr("clock"));
}

int64_t ResidentBytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return -1;
}

// What a layer build does on the load thread: weight matrices of a few MiB (E=768: 2.25 MiB) and smaller
// buffers, touched, then freed.
void AllocateTouchAndFreeOnLoadThread(int64_t total_bytes) {
  ASSERT_TRUE(RunAtBackgroundPriority([total_bytes] {
                std::vector<void*> blocks;
                std::mt19937 random(7);
                size_t block_bytes = 0;
                for (int64_t done = 0; done < total_bytes; done += block_bytes) {
                  block_bytes = blocks.size() % 2 == 0 ? size_t{2304} << 10 : size_t{384} << 10;
                  void* block = std::malloc(block_bytes);
                  if (block == nullptr) return absl::ResourceExhaustedError("test allocation");
                  std::memset(block, static_cast<int>(random() | 1), block_bytes);
                  blocks.push_back(block);
                }
                for (void* block : blocks) std::free(block);
                return absl::OkStatus();
              }).ok());
}

// With glibc's allocator, as the server sets it up (server/main.cc): the pad keeps a load's freed pages resident,
// and the release returns them (the load thread's heap top included, which malloc_trim alone leaves: without
// GiveBackHeapTops's poke on that thread, 23 of these 48 MiB stayed resident).
TEST(LoadHeapPadTest, RealAllocatorKeepsFreedPagesWhileRaisedAndReturnsThemOnRelease) {
#if defined(ABSL_HAVE_ADDRESS_SANITIZER) || defined(ABSL_HAVE_THREAD_SANITIZER)
  GTEST_SKIP() << "the sanitizer's allocator replaces glibc's; make test runs this case";
#endif
  mallopt(M_MMAP_THRESHOLD, kServerMmapThresholdBytes);
  mallopt(M_TRIM_THRESHOLD, 4 << 20);
  constexpr int64_t kLoadBytes = int64_t{48} << 20;
  LoadHeapPad::Options options;
  options.pad_bytes = int64_t{64} << 20;
  options.hold = absl::ZeroDuration();
  auto pad = LoadHeapPad::Create(std::move(options));
  ASSERT_TRUE(pad.ok()) << pad.status();
  AllocateTouchAndFreeOnLoadThread(4 << 20);  // starts the load thread and its heap
  malloc_trim(0);
  const int64_t before = ResidentBytes();
  {
    auto load = (*pad)->LoadStarting();
    AllocateTouchAndFreeOnLoadThread(kLoadBytes);
  }
  const int64_t kept = ResidentBytes() - before;
  ASSERT_TRUE((*pad)->ReleaseIfIdle());
  const int64_t left = ResidentBytes() - before;
  EXPECT_GT(kept, kLoadBytes * 3 / 4) << "freed pages were not kept while the pad was raised";
  EXPECT_LT(left, int64_t{8} << 20) << "kept " << kept << " bytes, " << left << " still resident after release";
}

}  // namespace
}  // namespace attnserve
