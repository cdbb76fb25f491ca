// The CPUs divided among the batches computing at once (a session's memory projection takes a share as a batch
// does: sessions/session_store.h). A batch that computes alone takes every CPU (its OpenMP
// team spans them, which is what a lone large request needs); a batch that starts while others compute takes
// its fair part, cpus / running, of the CPUs no batch holds, rounded down to a power of two (so that few team
// sizes exist, each warmed up: TeamSizes), and at least 1. Under load the workers so compute side by side on
// one thread each instead of as teams that stall whenever another thread (the transport's, a client's)
// preempts one of them (BENCHMARKS.md, "One worker per CPU"). A share is fixed when its batch starts: a batch
// that began alone keeps its team until it ends, and one that starts meanwhile gets 1 thread, the only time
// the threads handed out exceed the CPUs.
//
// Thread-safety: Take, the Share's destructor and the accessors may be called from any thread at once.
#pragma once

#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace attnserve {

class CpuShares {
 public:
  struct Options {
    // CPUs to divide, >= 1.
    int cpus = 1;
  };
  // InvalidArgument when cpus < 1.
  static absl::StatusOr<std::unique_ptr<CpuShares>> Create(const Options& options);

  // One batch's share, held while it computes; gives its threads back when destroyed. Movable.
  class Share {
   public:
    Share(Share&& other) noexcept : shares_(other.shares_), threads_(other.threads_) { other.shares_ = nullptr; }
    Share& operator=(Share&&) = delete;
    Share(const Share&) = delete;
    ~Share() { Release(); }
    // OpenMP threads the batch may use, >= 1.
    int threads() const { return threads_; }

   private:
    friend class CpuShares;
    Share(CpuShares* shares, int threads) : shares_(shares), threads_(threads) {}
    void Release();
    CpuShares* shares_;
    int threads_;
  };

  // The share of a batch starting now (see above).
  Share Take() ABSL_LOCKS_EXCLUDED(mu_);
  // What is held now: batches holding a share, and the threads they hold.
  struct Held {
    int running = 0;
    int threads = 0;
  };
  Held held() const ABSL_LOCKS_EXCLUDED(mu_);
  int cpus() const { return cpus_; }

  // Every team size a share can have when `workers` threads take shares of `cpus`: {cpus} for one worker,
  // else cpus and the powers of two below it. Descending.
  static std::vector<int> TeamSizes(int cpus, int workers);
  // The largest share taken on the calling thread since the last call (0 when none), then forgets it: the team
  // whose per-thread scratch a worker about to idle releases (core/team_scratch.h).
  static int TakeLargestTeamOnThisThread();

 private:
  explicit CpuShares(int cpus) : cpus_(cpus) {}

  const int cpus_;
  mutable absl::Mutex mu_;
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  int granted_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace attnserve
