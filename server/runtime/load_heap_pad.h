// Keeps freed heap pages for the next layer build while layers are being loaded, and gives them back once
// loads stop. A reload builds a new version (weights, warm-up buffers) in fresh pages while the version it
// replaces is freed: on this kind of VM each first touch of a 4 KiB page costs ~13 us, and that page-fault
// work, not the build's CPU time, is what raised the p99 of the layers being served while others reloaded
// (BENCHMARKS.md, issue #10). Normally blocks of 1 MiB and more are mapped on their own and unmapped when freed
// (so that a flood's or a replaced layer's memory goes back at once, server/main.cc), and a heap returns what
// it frees at its top. While loads happen both change: blocks below `load_mmap_threshold_bytes` (a layer's
// weight matrices) come from the heaps, and each heap keeps `pad_bytes` free at its top, so the next build
// reuses pages already mapped: a reload of an E=768 layer took 4,700 page faults and 290 with it. Held for the
// whole process it would cost every replica the pad: here it is raised when a load starts, and put back
// (the heaps trimmed) `hold` after the last load ended.
//
// While raised, large request buffers also come from the heaps, and what they free stays resident until the
// release (the server's trimmer does not trim meanwhile); the memory budget still bounds what requests hold at
// once, so the resident set grows by at most the pad per heap beyond what it would have reached anyway.
//
// Policy only: the allocator calls are injected (Options::tune_malloc, give_back), and so is the time, so that
// tests drive it from one thread. Thread-safety: every method may be called from any thread at once.
// The allocator's settings are process-wide: with several servers in one process (tests), the last to
// release wins.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/batching/clock.h"

namespace attnserve {

// The server's mmap threshold (set first thing in main): blocks of a MiB and more are mapped on their own.
inline constexpr int64_t kServerMmapThresholdBytes = int64_t{1} << 20;

class LoadHeapPad {
 public:
  struct Options {
    // Free memory each heap keeps at its top while loads happen; 0 turns the pad off (no allocator call).
    // Must be at least glibc's default (128 KiB) and at most 1 GiB.
    int64_t pad_bytes = int64_t{64} << 20;
    // Blocks this large and larger are mapped on their own: while loads happen, and otherwise (the process's
    // setting, restored on release). glibc caps the first at 32 MiB (half a thread heap's size); the second
    // must be at least 512 KiB (GiveBackHeapTops's block must come from a heap).
    int64_t load_mmap_threshold_bytes = int64_t{32} << 20;
    int64_t mmap_threshold_bytes = kServerMmapThresholdBytes;
    // How long after the last load ended the pad stays: back-to-back loads (a config reload of many layers, a
    // rolling update) and the replaced versions' frees, which come after their successors publish, reuse it.
    absl::Duration hold = absl::Seconds(5);
    // Released between two loads once it has been raised this long, however often loads come: a caller loading
    // every few seconds must not keep the server's heaps untrimmed (the memory of floods with them).
    absl::Duration max_raised = absl::Seconds(60);
    const Clock* clock = RealClock();  // not owned; must outlive the pad
    // Sets the allocator's top pad and mmap threshold; empty: TuneMalloc.
    std::function<void(int64_t top_pad_bytes, int64_t mmap_threshold_bytes)> tune_malloc;
    // Called after the pad is put back: returns what the heaps keep above it; empty: GiveBackHeapTops.
    std::function<void()> give_back;
  };

  // While alive, a load (or an unload, whose frees the release then trims) is in progress: the pad stays up.
  class Scope {
   public:
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;
    ~Scope() { pad_->LoadEnded(); }

   private:
    friend class LoadHeapPad;
    explicit Scope(LoadHeapPad* pad) : pad_(pad) {}
    LoadHeapPad* pad_;
  };

  // InvalidArgument naming the option out of range.
  static absl::StatusOr<std::unique_ptr<LoadHeapPad>> Create(Options options);
  // Puts the allocator's settings back if they are raised (the heaps are left as they are).
  ~LoadHeapPad();

  // Raises the pad (if it is not already) for the load the returned scope spans.
  [[nodiscard]] std::unique_ptr<Scope> LoadStarting() ABSL_LOCKS_EXCLUDED(mu_);

  // Puts the pad back and gives the heaps' tops back once no load runs and either `hold` has passed since the
  // last one ended or the pad has been up `max_raised`; true when it did. Called periodically (the server's
  // trimmer, once a second).
  bool ReleaseIfIdle() ABSL_LOCKS_EXCLUDED(mu_);

  // Whether the pad is up: the server's trimmer does not trim meanwhile (it would drop the pages kept).
  bool raised() const ABSL_LOCKS_EXCLUDED(mu_);

  // glibc's default top pad (man mallopt), restored on release.
  static constexpr int64_t kDefaultTopPadBytes = 128 << 10;

 private:
  explicit LoadHeapPad(Options options) : options_(std::move(options)) {}
  void LoadEnded() ABSL_LOCKS_EXCLUDED(mu_);

  const Options options_;
  mutable absl::Mutex mu_;
  int loads_running_ ABSL_GUARDED_BY(mu_) = 0;
  bool raised_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time raised_at_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  absl::Time last_load_ended_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
};

// mallopt(M_TOP_PAD, top_pad_bytes) and mallopt(M_MMAP_THRESHOLD, mmap_threshold_bytes); a refusal is logged.
void TuneMalloc(int64_t top_pad_bytes, int64_t mmap_threshold_bytes);

// Returns the free memory above the top pad: malloc_trim trims the main heap's top and the free chunks inside
// every heap, but not the top of a thread's heap, which glibc trims only when a chunk of 64 KiB or more of that
// heap is freed. The heap that grows during loads is the load thread's (RunAtBackgroundPriority): a block of
// that size allocated and freed there trims it. Other threads' heap tops are trimmed at their next such free
// (the workers' at their next large request). Does nothing while the load thread is busy: a load runs, which
// raised the pad again, and its own release will give back.
void GiveBackHeapTops();

}  // namespace attnserve
