// Random cases for the strip kernels' tests (tests/unit/flash_strips_test.cc, flash_strips_bf16_test.cc), f32 and
// bf16 alike: every head size the kernels take, every strip height, key ranges that start on panels and end
// mid-panel, strided operands; and the checks that each output is within a float64 reference and that nothing
// outside it was written.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/flash_strips_avx512.h"
#include "gtest/gtest.h"

namespace attnserve::testing {

constexpr float kStripCanary = 1234.5f;  // what the kernels must leave alone outside their outputs

inline int64_t Pick(std::mt19937_64& rng, int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

// Scores [rows, cols] (row stride ld_s) of Q [rows, dh] (row stride ld_q) against keys [k0, k0 + cols) of `keys`
// keys (row stride ld_k), k0 a multiple of 16.
struct StripScoresCase {
  int64_t dh, rows, keys, k0, cols, ld_q, ld_k, ld_s;

  // Head sizes 1 to 128 in the first 128 iterations, then random.
  static StripScoresCase Draw(std::mt19937_64& rng, int iter) {
    StripScoresCase c{};
    c.dh = iter < kFlashStripMaxHeadDim ? iter + 1 : Pick(rng, 1, kFlashStripMaxHeadDim);
    c.rows = Pick(rng, 1, kFlashStripRows);
    c.keys = Pick(rng, 1, 300);
    c.k0 = Pick(rng, 0, (c.keys - 1) / 16) * 16;
    c.cols = Pick(rng, 1, c.keys - c.k0);
    c.ld_q = c.dh + Pick(rng, 0, 40);
    c.ld_k = c.dh + Pick(rng, 0, 40);
    c.ld_s = c.cols + Pick(rng, 0, 20);
    return c;
  }
};

inline std::ostream& operator<<(std::ostream& os, const StripScoresCase& c) {
  return os << "dh " << c.dh << " rows " << c.rows << " keys " << c.keys << " k0 " << c.k0 << " cols " << c.cols;
}

// out [rows, ld]: within `tolerance` of want(r, j) for j < cols, and `untouched(r, j)` past them (the value before
// the kernel ran). Fails at the first mismatch.
template <typename Want, typename Untouched>
void ExpectStripOutput(const std::vector<float>& out, int64_t rows, int64_t cols, int64_t ld, double tolerance,
                       Want want, Untouched untouched) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < ld; ++j) {
      const float got = out[r * ld + j];
      if (j >= cols) {
        ASSERT_EQ(got, untouched(r, j)) << "wrote past its columns at row " << r << " col " << j;
        continue;
      }
      ASSERT_NEAR(got, want(r, j), tolerance) << "row " << r << " col " << j;
    }
  }
}

}  // namespace attnserve::testing
