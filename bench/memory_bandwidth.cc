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

// The sum of a[0, n), n a multiple of 32: four vector accumulators, so that the adds keep up with the loads.
double Sum(const double* a, size_t n, int threads) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : s0, s1, s2, s3)
  for (size_t i = 0; i < n; i += 32) {
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (size_t k = 0; k < 8; ++k) {
      s0 += a[i + k];
      s1 += a[i + 8 + k];
      s2 += a[i + 16 + k];
      s3 += a[i + 24 + k];
    }
  }
  return s0 + s1 + s2 + s3;
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
