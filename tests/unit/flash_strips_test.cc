// FlashAttention's f32 strip kernels (core/flash_strips_avx512.h): the matmuls against float64 products (every
// head size they take, every strip height, key ranges that start on panels and end mid-panel, strided operands,
// nothing written outside their rows and columns) and the softmax step against the portable one.
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "core/flash_strips_avx512.h"
#include "core/row_softmax.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_mha.h"
#include "tests/testing/strip_cases.h"

namespace attnserve {
namespace {

using testing::ExpectStripOutput;
using testing::Pick;
using testing::RandomValues;
using testing::StripScoresCase;

constexpr float kCanary = testing::kStripCanary;

// Each test fails (rather than skips) where the kernels cannot run: this project's CI machines have AVX-512.
#define ASSERT_STRIPS_RUN_HERE()                                                      \
  ASSERT_TRUE(FlashStripsAvailable(1) && FlashStripsAvailable(kFlashStripMaxHeadDim)) \
      << "no AVX-512 F here, or ATTNSERVE_MAX_KERNEL_ISA caps it"

// Every head size the kernels take, key counts that end mid-panel, strided rows; the keys' buffer ends at the last
// key's last element, so that a plain (unmasked) read past it is past the allocation for ASan.
TEST(FlashStripsTest, PackKeyPanelsLaysKeysOutInPanelsOfSixteenZeroPadded) {
  ASSERT_STRIPS_RUN_HERE();
  std::mt19937_64 rng(1);
  for (int iter = 0; iter < 300; ++iter) {
    const int64_t dh = iter < kFlashStripMaxHeadDim ? iter + 1 : Pick(rng, 1, kFlashStripMaxHeadDim);
    const int64_t keys = Pick(rng, 1, 70), ld = dh + Pick(rng, 0, 20), padded = (keys + 15) / 16 * 16;
    SCOPED_TRACE(::testing::Message() << "dh " << dh << " keys " << keys << " ld " << ld);
    const std::vector<float> k = RandomValues(rng, (keys - 1) * ld + dh);
    std::vector<float> panels(PackedKeyFloats(keys, dh) + 16, kCanary);
    ASSERT_EQ(panels.size(), static_cast<size_t>(padded * dh + 16));
    PackKeyPanels(k.data(), keys, ld, dh, panels.data());
    for (int64_t j = 0; j < padded; ++j) {
      for (int64_t d = 0; d < dh; ++d) {
        const float want = j < keys ? k[j * ld + d] : 0.0f;
        ASSERT_EQ(panels[(j / 16) * 16 * dh + d * 16 + j % 16], want) << "key " << j << " dim " << d;
      }
    }
    for (size_t i = padded * dh; i < panels.size(); ++i) ASSERT_EQ(panels[i], kCanary) << "past the panels: " << i;
  }
}

TEST(FlashStripsTest, ScoresMatchFloat64) {
  ASSERT_STRIPS_RUN_HERE();
  std::mt19937_64 rng(20261206);
  for (int iter = 0; iter < 400; ++iter) {
    const StripScoresCase c = StripScoresCase::Draw(rng, iter);
    SCOPED_TRACE(::testing::Message() << c);
    const std::vector<float> q = RandomValues(rng, c.rows * c.ld_q), k = RandomValues(rng, c.keys * c.ld_k);
    std::vector<float> panels(PackedKeyFloats(c.keys, c.dh));
    PackKeyPanels(k.data(), c.keys, c.ld_k, c.dh, panels.data());
    std::vector<float> scores(c.rows * c.ld_s, kCanary);
    StripScores(q.data(), c.ld_q, c.rows, panels.data(), c.k0, c.cols, c.dh, scores.data(), c.ld_s);
    auto want = [&](int64_t r, int64_t j) {
      double dot = 0.0;
      for (int64_t d = 0; d < c.dh; ++d) dot += double{q[r * c.ld_q + d]} * k[(c.k0 + j) * c.ld_k + d];
      return dot;
    };
    ASSERT_NO_FATAL_FAILURE(ExpectStripOutput(scores, c.rows, c.cols, c.ld_s,
                                              4e-5 * std::sqrt(static_cast<double>(c.dh)), want,
                                              [](int64_t, int64_t) { return kCanary; }));
  }
}

TEST(FlashStripsTest, ContextAddsToTheAccumulatorAsFloat64) {
  ASSERT_STRIPS_RUN_HERE();
  std::mt19937_64 rng(20261207);
  for (int iter = 0; iter < 400; ++iter) {
    const int64_t dh = iter < 128 ? iter + 1 : Pick(rng, 1, kFlashStripMaxHeadDim);
    const int64_t rows = Pick(rng, 1, kFlashStripRows), cols = Pick(rng, 1, 300);
    const int64_t ld_p = cols + Pick(rng, 0, 20), ld_acc = dh + Pick(rng, 0, 20);
    SCOPED_TRACE(::testing::Message() << "dh " << dh << " rows " << rows << " cols " << cols);
    std::vector<float> probs = RandomValues(rng, rows * ld_p);
    for (float& p : probs) p = std::abs(p) / static_cast<float>(cols);  // softmax-sized weights
    const std::vector<float> v = RandomValues(rng, cols * dh), start = RandomValues(rng, rows * ld_acc);
    std::vector<float> acc = start;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t d = dh; d < ld_acc; ++d) acc[r * ld_acc + d] = kCanary;
    }
    StripAddContext(probs.data(), ld_p, rows, v.data(), cols, dh, acc.data(), ld_acc);
    auto want = [&](int64_t r, int64_t d) {
      double sum = start[r * ld_acc + d];
      for (int64_t j = 0; j < cols; ++j) sum += double{probs[r * ld_p + j]} * v[j * dh + d];
      return sum;
    };
    ASSERT_NO_FATAL_FAILURE(
        ExpectStripOutput(acc, rows, dh, ld_acc, 2e-5, want, [](int64_t, int64_t) { return kCanary; }));
  }
}

// Equal within `tolerance`, or both NaN, or the same infinity.
bool Same(float got, float want, double tolerance) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::abs(double{got} - want) <= tolerance;
}

// StripOnlineSoftmax against the portable OnlineSoftmaxBlock: the same probabilities, running max and sum and
// rescaled context, for rows with an earlier state and without, causal prefixes of every length (none open,
// part, all), masked keys (-inf), a row masked whole, a NaN or +inf score, row tails that end mid-register, and
// the row padding past `cols` left alone.
TEST(FlashStripsTest, StripSoftmaxMatchesTheOnlineSoftmaxBlock) {
  ASSERT_STRIPS_RUN_HERE();
  std::mt19937_64 rng(20261208);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int iter = 0; iter < 300; ++iter) {
    const int64_t rows = Pick(rng, 1, 8), cols = Pick(rng, 1, 300), ld = cols + Pick(rng, 0, 17);
    const int64_t dh = Pick(rng, 1, 70), open0 = Pick(rng, -rows - 2, cols + 2);
    SCOPED_TRACE(::testing::Message() << "rows " << rows << " cols " << cols << " open0 " << open0);
    std::vector<float> scores = RandomValues(rng, rows * ld, 3.0f);
    for (float& x : scores) {
      if (Pick(rng, 0, 9) == 0) x = kNegInf;
    }
    if (Pick(rng, 0, 3) == 0) std::fill_n(scores.begin() + Pick(rng, 0, rows - 1) * ld, cols, kNegInf);
    if (iter % 10 == 0) scores[Pick(rng, 0, rows * ld - 1)] = std::numeric_limits<float>::quiet_NaN();
    if (iter % 10 == 5) scores[Pick(rng, 0, rows * ld - 1)] = std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < rows; ++r)
      std::fill(scores.begin() + r * ld + cols, scores.begin() + (r + 1) * ld, kCanary);
    std::vector<float> row_max(rows), row_sum(rows);
    for (int64_t r = 0; r < rows; ++r) {
      const bool started = Pick(rng, 0, 2) != 0;
      row_max[r] = started ? RandomValues(rng, 1, 3.0f)[0] : kNegInf;
      row_sum[r] = started ? 1.0f + std::abs(RandomValues(rng, 1)[0]) : 0.0f;
    }
    const std::vector<float> acc = RandomValues(rng, rows * dh);
    std::vector<float> want_scores = scores, want_max = row_max, want_sum = row_sum, want_acc = acc;
    OnlineSoftmaxBlock(want_scores.data(), rows, cols, ld, open0, want_max.data(), want_sum.data(), want_acc.data(), dh,
                       dh);
    std::vector<float> got_acc = acc;
    StripOnlineSoftmax(scores.data(), rows, cols, ld, open0, row_max.data(), row_sum.data(), got_acc.data(), dh, dh);
    for (int64_t r = 0; r < rows; ++r) {
      ASSERT_TRUE(Same(row_max[r], want_max[r], 0.0)) << "row " << r << ": " << row_max[r] << " vs " << want_max[r];
      ASSERT_TRUE(Same(row_sum[r], want_sum[r], 1e-6 * std::abs(want_sum[r]))) << "row " << r;
      for (int64_t j = 0; j < ld; ++j) {
        ASSERT_TRUE(Same(scores[r * ld + j], want_scores[r * ld + j], 1e-6)) << "row " << r << " key " << j;
      }
      for (int64_t d = 0; d < dh; ++d) {
        ASSERT_TRUE(Same(got_acc[r * dh + d], want_acc[r * dh + d], 1e-6)) << "row " << r << " dim " << d;
      }
    }
  }
}

TEST(FlashStripsTest, HeadsWiderThanTheKernelsAreNotAvailable) {
  EXPECT_FALSE(FlashStripsAvailable(kFlashStripMaxHeadDim + 1));
  EXPECT_FALSE(FlashStripsAvailable(0));
}

}  // namespace
}  // namespace attnserve
