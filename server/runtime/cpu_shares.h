// The CPUs divided among the batches computing at once. A batch that runs alone takes every CPU (its OpenMP
// team spans them, which is what a lone large request needs); while several run, each takes cpus / running
// (at least 1), so that under load the workers compute side by side on one thread each instead of as teams
// that stall whenever another thread (the transport's, a client's) preempts one of them (BENCHMARKS.md, "One
// worker per CPU"). A share is fixed when its batch starts: a batch that began alone keeps its team while the
// next one starts, until it ends.
//
// Thread-safety: Take and the Share's destructor may be called from any thread at once.
#pragma once

#include <atomic>
#include <memory>

#include "absl/status/statusor.h"

namespace attnserve {

class CpuShares {
 public:
  struct Options {
    // CPUs to divide, >= 1.
    int cpus = 1;
  };
  // InvalidArgument when cpus < 1.
  static absl::StatusOr<std::unique_ptr<CpuShares>> Create(const Options& options);

  // One batch's share, held while it computes; releases it when destroyed. Movable.
  class Share {
   public:
    Share(Share&& other) noexcept : shares_(other.shares_), threads_(other.threads_) { other.shares_ = nullptr; }
    Share& operator=(Share&&) = delete;
    Share(const Share&) = delete;
    ~Share();
    // OpenMP threads the batch may use, >= 1.
    int threads() const { return threads_; }

   private:
    friend class CpuShares;
    Share(CpuShares* shares, int threads) : shares_(shares), threads_(threads) {}
    CpuShares* shares_;
    int threads_;
  };

  // The share of a batch starting now: cpus / (batches running, this one included), at least 1.
  Share Take();
  // Batches holding a share now.
  int running() const { return running_.load(std::memory_order_relaxed); }
  int cpus() const { return cpus_; }

 private:
  explicit CpuShares(int cpus) : cpus_(cpus) {}
  const int cpus_;
  std::atomic<int> running_{0};
};

}  // namespace attnserve
