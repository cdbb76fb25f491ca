#include "server/runtime/memory_budget.h"

#include <unistd.h>

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace attnserve {

MemoryBudget::Reservation& MemoryBudget::Reservation::operator=(Reservation&& other) noexcept {
  if (this != &other) {
    Release();
    budget_ = other.budget_;
    bytes_ = other.bytes_;
    other.budget_ = nullptr;
  }
  return *this;
}

void MemoryBudget::Reservation::Release() {
  if (budget_ != nullptr) budget_->Changed(budget_->reserved_.fetch_sub(bytes_, std::memory_order_relaxed) - bytes_);
  budget_ = nullptr;
}

absl::StatusOr<MemoryBudget::Reservation> MemoryBudget::Reserve(int64_t bytes) {
  int64_t reserved = reserved_.load(std::memory_order_relaxed);
  do {
    if (bytes > budget_bytes_ - reserved) {
      return absl::ResourceExhaustedError(absl::StrCat("memory budget: the request needs ", bytes, " bytes, ",
                                                       reserved, " of ", budget_bytes_, " are reserved"));
    }
  } while (!reserved_.compare_exchange_weak(reserved, reserved + bytes, std::memory_order_relaxed));
  Changed(reserved + bytes);
  return Reservation(this, bytes);
}

int64_t RequestCostBytes(const ParsedAttention& p, const MhaConfig& c, int64_t scores_block_bytes,
                         int64_t request_bytes) {
  constexpr int64_t kF32 = 4;
  const int64_t e = c.embed_dim;
  // Inputs gathered into one matrix (when batched with others), and the projections: fused [N, 3E] for
  // self-attention, Q [N, E] and K, V [N_kv, E] otherwise; the output projection's buffer.
  const int64_t gathered = kF32 * (p.query_tokens() * e + p.kv_tokens() * (c.key_dim() + c.value_dim()));
  const int64_t projections = kF32 * (p.query_tokens() * 2 * e + p.kv_tokens() * 2 * e);
  const int64_t workspace = gathered + projections + scores_block_bytes;
  return request_bytes + workspace + 2 * p.answer_bytes();
}

int64_t MemoryLimitFromCgroup(const std::string& line) {
  if (line.empty() || line == "max") return 0;
  try {
    const long long v = std::stoll(line);
    // cgroup v1 reports "no limit" as a huge page-rounded number.
    return v <= 0 || v >= (int64_t{1} << 60) ? 0 : v;
  } catch (...) {
    return 0;
  }
}

namespace {

std::string FirstLine(const char* path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

}  // namespace

int64_t DefaultMemoryBudgetBytes(std::string* source) {
  int64_t limit = MemoryLimitFromCgroup(FirstLine("/sys/fs/cgroup/memory.max"));
  std::string from = "cgroup memory.max";
  if (limit == 0) {
    limit = MemoryLimitFromCgroup(FirstLine("/sys/fs/cgroup/memory/memory.limit_in_bytes"));
    from = "cgroup memory.limit_in_bytes";
  }
  if (limit == 0) {
    limit = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<int64_t>(sysconf(_SC_PAGE_SIZE));
    from = "physical memory";
  }
  if (source != nullptr) *source = absl::StrCat("half of ", from, " (", limit, " bytes)");
  return limit / 2;
}

}  // namespace attnserve
