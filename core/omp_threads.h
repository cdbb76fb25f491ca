// The OpenMP team size of the calling thread, for a scope (oneDNN reads it when it executes a primitive), and
// memory-bound passes split over that team.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace attnserve {

class ScopedOmpThreads {
 public:
  explicit ScopedOmpThreads(int threads) : saved_(omp_get_max_threads()) { omp_set_num_threads(threads); }
  ~ScopedOmpThreads() { omp_set_num_threads(saved_); }
  ScopedOmpThreads(const ScopedOmpThreads&) = delete;
  ScopedOmpThreads& operator=(const ScopedOmpThreads&) = delete;

 private:
  const int saved_;
};

// Runs fn(begin, end) over [0, items) cut into one equal range per thread of the calling thread's OpenMP team,
// when the work (`items * elements_per_item` elements) is worth a fork; otherwise fn(0, items) on the calling
// thread, also inside a parallel region (a nested team would start fresh threads).
template <typename Fn>
void ParallelRanges(int64_t items, int64_t elements_per_item, Fn fn) {
  constexpr int64_t kSerialBelowElements = int64_t{1} << 16;
  const int team = omp_in_parallel() ? 1 : omp_get_max_threads();
  if (team <= 1 || items < team || items * elements_per_item < kSerialBelowElements) {
    fn(int64_t{0}, items);
    return;
  }
  const int64_t per_thread = (items + team - 1) / team;
#pragma omp parallel for num_threads(team) schedule(static)
  for (int t = 0; t < team; ++t) {
    const int64_t begin = t * per_thread, end = std::min(items, begin + per_thread);
    if (begin < end) fn(begin, end);
  }
}

}  // namespace attnserve
