// A STREAM-style copy on this machine: the memory bandwidth the sessions' attention over the KV cache is
// measured against (it is memory-bound: each decode step reads every cached key and value once).
//   attnserve_memory_bandwidth [MiB per array, default 512] [threads, default omp_get_max_threads()]
// Prints one JSON object: the best of 10 copies, in GB/s counting bytes read plus bytes written (STREAM's rule),
// and the read bandwidth alone (half of it).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

int main(int argc, char** argv) {
  const size_t mib = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 512;
  const int threads = argc > 2 ? std::atoi(argv[2]) : omp_get_max_threads();
  const size_t n = mib * (size_t{1} << 20) / sizeof(double);
  std::vector<double> a(n), b(n);
#pragma omp parallel for num_threads(threads)
  for (size_t i = 0; i < n; ++i) a[i] = static_cast<double>(i), b[i] = 0;  // touch every page first
  double best = 0;
  for (int rep = 0; rep < 10; ++rep) {
    const auto start = std::chrono::steady_clock::now();
#pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t i = 0; i < n; ++i) b[i] = a[i];
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, 2.0 * static_cast<double>(n * sizeof(double)) / s / 1e9);
  }
  std::printf("{\"copy_gb_per_s\": %.2f, \"read_gb_per_s\": %.2f, \"mib\": %zu, \"threads\": %d, \"check\": %.0f}\n",
              best, best / 2, mib, threads, b[n - 1]);
  return 0;
}
