#include "server/runtime/heap_trim_policy.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace attnserve {

absl::StatusOr<std::unique_ptr<HeapTrimPolicy>> HeapTrimPolicy::Create(const Options& options) {
  if (options.growth_trim_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("growth_trim_bytes: must be > 0, got ", options.growth_trim_bytes));
  }
  if (options.idle_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("idle_interval: must be > 0, got ", absl::FormatDuration(options.idle_interval)));
  }
  return std::unique_ptr<HeapTrimPolicy>(new HeapTrimPolicy(options));
}

HeapTrimPolicy::Trim HeapTrimPolicy::Check(absl::Time now, int64_t rss_bytes, bool requests_hold_memory,
                                           bool layers_loading) {
  if (layers_loading) {  // what a load adds is its own (live weights, the pad's pages): counted from after it
    lowest_rss_bytes_ = rss_bytes;
    return Trim::kNone;
  }
  if (rss_bytes >= 0) {
    lowest_rss_bytes_ = lowest_rss_bytes_ < 0 ? rss_bytes : std::min(lowest_rss_bytes_, rss_bytes);
  }
  if (rss_bytes >= 0 && rss_bytes - lowest_rss_bytes_ >= options_.growth_trim_bytes) return Trim::kGrowth;
  if (!requests_hold_memory && now - last_trim_ >= options_.idle_interval) return Trim::kIdle;
  return Trim::kNone;
}

void HeapTrimPolicy::Trimmed(absl::Time now, int64_t rss_after_bytes) {
  last_trim_ = now;
  lowest_rss_bytes_ = rss_after_bytes;
}

int64_t HeapGrowthTrimBytes(int64_t memory_budget_bytes) {
  return std::max<int64_t>(int64_t{16} << 20, memory_budget_bytes / 8);
}

const char* HeapTrimName(HeapTrimPolicy::Trim trim) {
  switch (trim) {
    case HeapTrimPolicy::Trim::kGrowth:
      return "growth";
    case HeapTrimPolicy::Trim::kIdle:
      return "idle";
    case HeapTrimPolicy::Trim::kNone:
      break;
  }
  return "none";
}

}  // namespace attnserve
