// A STREAM-style copy on this machine: the memory bandwidth the sessions' attention over the KV cache is
// measured against (it is memory-bound: each decode step reads every cached key and value once).
//   attnserve_memory_bandwidth [MiB per array, default 512] [threads, default omp_get_max_threads()]
// Prints one JSON object: the best of 10 copies, in GB/s counting bytes read plus bytes written (STREAM's rule),
// half of that (the copy's reads), and the best of 10 sums of one array (reads alone, as a decode step's are).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

// Seconds `body` takes at best of 10.
template <typename Body>
double BestSeconds(Body body) {
  double best = 1e30;
  for (int rep = 0; rep < 10; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    body();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

// Two doubles: one SSE2 register, which every x86-64 CPU has (this file is built for the baseline).
typedef double Pair __attribute__((vector_size(16)));

// The sum of a[0, n), n a multiple of 16: eight independent vector accumulators, so that the adds keep up with
// the loads (a single chain of adds, or an `omp simd` reduction GCC spills through the stack, would measure
// the adds instead of the memory).
double Sum(const double* a, size_t n, int threads) {
  double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    Pair acc[8] = {};
#pragma omp for schedule(static)
    for (size_t i = 0; i < n; i += 16) {
      for (int k = 0; k < 8; ++k) {
        Pair v;
        std::memcpy(&v, a + i + 2 * k, sizeof(v));
        acc[k] += v;
      }
    }
    for (const Pair& v : acc) total += v[0] + v[1];
  }
  return total;
}

}  // namespace

int main(int argc, char** argv) {
  const size_t mib = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 512;
  const int threads = argc > 2 ? std::atoi(argv[2]) : omp_get_max_threads();
  const size_t n = mib * (size_t{1} << 20) / sizeof(double);
  std::vector<double> a(n), b(n);
#pragma omp parallel for num_threads(threads)
  for (size_t i = 0; i < n; ++i) a[i] = static_cast<double>(i), b[i] = 0;  // touch every page first
  const double bytes = static_cast<double>(n * sizeof(double));
  const double copy_s = BestSeconds([&] {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t i = 0; i < n; ++i) b[i] = a[i];
  });
  double sum = 0;
  const double read_s = BestSeconds([&] { sum = Sum(a.data(), n, threads); });
  const double copy = 2.0 * bytes / copy_s / 1e9;
  std::printf(
      "{\"copy_gb_per_s\": %.2f, \"read_gb_per_s\": %.2f, \"read_only_gb_per_s\": %.2f, \"mib\": %zu, "
      "\"threads\": %d, \"check\": %.0f, \"sum\": %.0f}\n",
      copy, copy / 2, bytes / read_s / 1e9, mib, threads, b[n - 1], sum);
  return 0;
}
