#include "server/runtime/cpu_shares.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace attnserve {
namespace {

thread_local int largest_team_on_thread = 0;

// The largest power of two <= n, for n >= 1; 1 for n < 1.
int PowerOfTwoAtMost(int n) {
  int p = 1;
  while (p <= n / 2) p *= 2;
  return p;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CpuShares>> CpuShares::Create(const Options& options) {
  if (options.cpus < 1) return absl::InvalidArgumentError(absl::StrCat("cpus must be >= 1, got ", options.cpus));
  return std::unique_ptr<CpuShares>(new CpuShares(options.cpus));
}

CpuShares::Share CpuShares::Take() {
  int threads = 1;
  {
    absl::MutexLock lock(&mu_);
    ++running_;
    const int fair = std::min(cpus_ / running_, cpus_ - granted_);
    threads = fair >= cpus_ ? cpus_ : PowerOfTwoAtMost(fair);
    granted_ += threads;
  }
  largest_team_on_thread = std::max(largest_team_on_thread, threads);
  return Share(this, threads);
}

void CpuShares::Share::Release() {
  if (shares_ == nullptr) return;
  absl::MutexLock lock(&shares_->mu_);
  --shares_->running_;
  shares_->granted_ -= threads_;
  shares_ = nullptr;
}

CpuShares::Held CpuShares::held() const {
  absl::MutexLock lock(&mu_);
  return {running_, granted_};
}

std::vector<int> CpuShares::TeamSizes(int cpus, int workers) {
  std::vector<int> sizes = {std::max(1, cpus)};
  if (workers <= 1) return sizes;
  for (int p = PowerOfTwoAtMost(cpus); p >= 1; p /= 2) {
    if (p < sizes.front()) sizes.push_back(p);
  }
  return sizes;
}

int CpuShares::TakeLargestTeamOnThisThread() {
  const int largest = largest_team_on_thread;
  largest_team_on_thread = 0;
  return largest;
}

}  // namespace attnserve
