#include "server/runtime/cpu_shares.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace attnserve {

absl::StatusOr<std::unique_ptr<CpuShares>> CpuShares::Create(const Options& options) {
  if (options.cpus < 1) return absl::InvalidArgumentError(absl::StrCat("cpus must be >= 1, got ", options.cpus));
  return std::unique_ptr<CpuShares>(new CpuShares(options.cpus));
}

CpuShares::Share CpuShares::Take() {
  const int running = running_.fetch_add(1, std::memory_order_relaxed) + 1;
  return Share(this, std::max(1, cpus_ / running));
}

CpuShares::Share::~Share() {
  if (shares_ != nullptr) shares_->running_.fetch_sub(1, std::memory_order_relaxed);
}

}  // namespace attnserve
