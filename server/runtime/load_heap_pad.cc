#include "server/runtime/load_heap_pad.h"

#include <malloc.h>

#include <atomic>
#include <cstdlib>

#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "server/runtime/background_priority.h"

namespace attnserve {

absl::StatusOr<std::unique_ptr<LoadHeapPad>> LoadHeapPad::Create(Options options) {
  if (options.pad_bytes != 0 && (options.pad_bytes < kDefaultTopPadBytes || options.pad_bytes > (int64_t{1} << 30))) {
    return absl::InvalidArgumentError(absl::StrCat("load heap pad: pad_bytes must be 0 or in [", kDefaultTopPadBytes,
                                                   ", 1073741824], got ", options.pad_bytes));
  }
  if (options.mmap_threshold_bytes < (int64_t{512} << 10) || options.mmap_threshold_bytes > (int64_t{32} << 20)) {
    return absl::InvalidArgumentError(absl::StrCat("load heap pad: mmap_threshold_bytes must be in [524288, ",
                                                   "33554432], got ", options.mmap_threshold_bytes));
  }
  if (options.load_mmap_threshold_bytes < options.mmap_threshold_bytes ||
      options.load_mmap_threshold_bytes > (int64_t{32} << 20)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "load heap pad: load_mmap_threshold_bytes must be in [mmap_threshold_bytes = ", options.mmap_threshold_bytes,
        ", 33554432], got ", options.load_mmap_threshold_bytes));
  }
  if (options.hold < absl::ZeroDuration() || options.max_raised < options.hold) {
    return absl::InvalidArgumentError(absl::StrCat("load heap pad: need 0 <= hold <= max_raised, got hold ",
                                                   absl::FormatDuration(options.hold), " and max_raised ",
                                                   absl::FormatDuration(options.max_raised)));
  }
  if (options.clock == nullptr) return absl::InvalidArgumentError("load heap pad: clock must not be null");
  if (!options.tune_malloc) options.tune_malloc = TuneMalloc;
  if (!options.give_back) options.give_back = GiveBackHeapTops;
  return std::unique_ptr<LoadHeapPad>(new LoadHeapPad(std::move(options)));
}

LoadHeapPad::~LoadHeapPad() {
  absl::MutexLock lock(&mu_);
  if (raised_) options_.tune_malloc(kDefaultTopPadBytes, options_.mmap_threshold_bytes);
}

std::unique_ptr<LoadHeapPad::Scope> LoadHeapPad::LoadStarting() {
  absl::MutexLock lock(&mu_);
  ++loads_running_;
  if (options_.pad_bytes > 0 && !raised_) {
    options_.tune_malloc(options_.pad_bytes, options_.load_mmap_threshold_bytes);
    raised_ = true;
    raised_at_ = options_.clock->Now();
  }
  return std::unique_ptr<Scope>(new Scope(this));
}

void LoadHeapPad::LoadEnded() {
  absl::MutexLock lock(&mu_);
  --loads_running_;
  last_load_ended_ = options_.clock->Now();
}

bool LoadHeapPad::ReleaseIfIdle() {
  {
    absl::MutexLock lock(&mu_);
    if (!raised_ || loads_running_ > 0) return false;
    const absl::Time now = options_.clock->Now();
    if (now - last_load_ended_ < options_.hold && now - raised_at_ < options_.max_raised) return false;
    options_.tune_malloc(kDefaultTopPadBytes, options_.mmap_threshold_bytes);
    raised_ = false;
  }
  // Outside the lock: it may wait for the load thread.
  options_.give_back();
  return true;
}

bool LoadHeapPad::raised() const {
  absl::MutexLock lock(&mu_);
  return raised_;
}

void TuneMalloc(int64_t top_pad_bytes, int64_t mmap_threshold_bytes) {
  // mallopt returns 0 when it refuses a value (a sanitizer's allocator refuses all); the pad is then only less
  // effective. Said once.
  static std::atomic<bool> refusal_logged{false};
  if ((mallopt(M_TOP_PAD, static_cast<int>(top_pad_bytes)) == 0 ||
       mallopt(M_MMAP_THRESHOLD, static_cast<int>(mmap_threshold_bytes)) == 0) &&
      !refusal_logged.exchange(true)) {
    spdlog::warn("malloc refused top pad {} / mmap threshold {} bytes: layers load in fresh pages", top_pad_bytes,
                 mmap_threshold_bytes);
  }
}

void GiveBackHeapTops() {
  const bool poked = TryRunAtBackgroundPriority([] {
    // Below the mmap threshold, so it comes from this thread's heap; freeing it makes glibc trim that heap's top
    // down to the pad.
    constexpr size_t kTrimTriggerBytes = 256 << 10;
    void* block = std::malloc(kTrimTriggerBytes);
    if (block != nullptr) static_cast<volatile char*>(block)[0] = 1;  // not optimised away
    std::free(block);
    return absl::OkStatus();
  });
  if (poked) malloc_trim(0);
}

}  // namespace attnserve
