// FlashAttention's bf16 strip kernels (core/flash_strips_bf16.h): the pair layouts element by element, the matmuls
// against float64 products of the same bf16 values (every head size they take, odd ones included, every strip
// height, key ranges that start on panels and end mid-panel or mid-pair, strided operands, nothing written outside
// their rows and columns), and the softmax step against the f32 one and its probabilities bit for bit.
#include "core/flash_strips_bf16.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "common/half_float.h"
#include "core/exp_avx512.h"
#include "core/flash_strips_avx512.h"
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
constexpr uint16_t kCanary16 = 0x7E7E;  // the same for bf16 outputs

// Exactly n elements (capacity n: a read past them is past the allocation).
std::vector<uint16_t> RandomBf16(std::mt19937_64& rng, int64_t n) {
  const std::vector<float> values = RandomValues(rng, n);
  std::vector<uint16_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[i] = FloatToBFloat16(values[i]);
  return out;
}

double Value(uint16_t bits) { return BFloat16ToFloat(bits); }

// Each test fails (rather than skips) where the kernels cannot run: this project's CI machines have AVX512_BF16.
#define ASSERT_BF16_STRIPS_RUN_HERE()                                                         \
  ASSERT_TRUE(FlashBf16StripsAvailable(1) && FlashBf16StripsAvailable(kFlashStripMaxHeadDim)) \
      << "no AVX512_BF16 here, or ATTNSERVE_MAX_KERNEL_ISA caps AVX-512"

TEST(FlashStripsBf16Test, PackKeyPairPanelsLaysPairsOfDimensionsOutPerKeyZeroPadded) {
  std::mt19937_64 rng(1);
  const int64_t keys = 37, dh = 5, ld = 9, dh2 = 6;
  const std::vector<uint16_t> k = RandomBf16(rng, keys * ld);
  std::vector<uint16_t> panels(PackedKeyPairElems(keys, dh), kCanary16);
  ASSERT_EQ(panels.size(), 48u * dh2);
  PackKeyPairPanels(k.data(), keys, ld, dh, panels.data());
  for (int64_t j = 0; j < 48; ++j) {
    for (int64_t d = 0; d < dh2; ++d) {
      const uint16_t want = j < keys && d < dh ? k[j * ld + d] : 0;
      EXPECT_EQ(panels[(j / 16) * 16 * dh2 + (d / 2) * 32 + (j % 16) * 2 + d % 2], want) << "key " << j << " dim " << d;
    }
  }
}

TEST(FlashStripsBf16Test, PackValuePairsLaysPairsOfKeysOutPerDimensionZeroPadded) {
  std::mt19937_64 rng(2);
  const int64_t keys = 7, dh = 20, ld = 23, dh16 = 32;
  const std::vector<uint16_t> v = RandomBf16(rng, keys * ld);
  std::vector<uint16_t> pairs(PackedValuePairElems(keys, dh), kCanary16);
  ASSERT_EQ(pairs.size(), 8u * dh16);
  PackValuePairs(v.data(), keys, ld, dh, pairs.data());
  for (int64_t j = 0; j < 8; ++j) {
    for (int64_t d = 0; d < dh16; ++d) {
      const uint16_t want = j < keys && d < dh ? v[j * ld + d] : 0;
      EXPECT_EQ(pairs[(j / 2) * 2 * dh16 + d * 2 + j % 2], want) << "key " << j << " dim " << d;
    }
  }
}

TEST(FlashStripsBf16Test, ScoresMatchFloat64OfTheBf16Operands) {
  ASSERT_BF16_STRIPS_RUN_HERE();
  std::mt19937_64 rng(20261207);
  for (int iter = 0; iter < 400; ++iter) {
    const StripScoresCase c = StripScoresCase::Draw(rng, iter);
    SCOPED_TRACE(::testing::Message() << c);
    // Q's rows end where the buffer ends: an odd head's last pair must not be read past it.
    const std::vector<uint16_t> q = RandomBf16(rng, (c.rows - 1) * c.ld_q + c.dh);
    const std::vector<uint16_t> k = RandomBf16(rng, c.keys * c.ld_k);
    std::vector<uint16_t> panels(PackedKeyPairElems(c.keys, c.dh));
    PackKeyPairPanels(k.data(), c.keys, c.ld_k, c.dh, panels.data());
    std::vector<float> scores(c.rows * c.ld_s, kCanary);
    StripScoresBf16(q.data(), c.ld_q, c.rows, panels.data(), c.k0, c.cols, c.dh, scores.data(), c.ld_s);
    auto want = [&](int64_t r, int64_t j) {
      double dot = 0.0;
      for (int64_t d = 0; d < c.dh; ++d) dot += Value(q[r * c.ld_q + d]) * Value(k[(c.k0 + j) * c.ld_k + d]);
      return dot;
    };
    ASSERT_NO_FATAL_FAILURE(ExpectStripOutput(scores, c.rows, c.cols, c.ld_s,
                                              4e-5 * std::sqrt(static_cast<double>(c.dh)), want,
                                              [](int64_t, int64_t) { return kCanary; }));
  }
}

// The f32 step's state after a random earlier block: row maxima (some rows saw nothing yet), sums and context.
struct SoftmaxState {
  std::vector<float> row_max, row_sum, acc;

  static SoftmaxState Draw(std::mt19937_64& rng, int64_t rows, int64_t acc_cols) {
    SoftmaxState st{RandomValues(rng, rows), RandomValues(rng, rows), RandomValues(rng, rows * acc_cols)};
    for (int64_t r = 0; r < rows; ++r) {
      if (Pick(rng, 0, 3) == 0) st.row_max[r] = -std::numeric_limits<float>::infinity();
      st.row_sum[r] = std::abs(st.row_sum[r]) + 0.5f;
    }
    return st;
  }
};

// exp(x - max) as the bf16 step takes it (ExpNonPositiveForBf16Avx512 of the float difference), rounded to bf16.
// (GCC 12 flags the undefined pass-through registers of _mm512_max_ps and _mm512_roundscale_ps as uninitialized
// here, not in the kernels' files: the registers are never read.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
ATTN_AVX512 void ExpForBf16(const float* x, float* out) {
  _mm512_storeu_ps(out, ExpNonPositiveForBf16Avx512(_mm512_loadu_ps(x)));
}
#pragma GCC diagnostic pop

uint16_t ExpectedProbability(float x, float max) {
  float lanes[16], out[16];
  std::fill_n(lanes, 16, x - max);
  ExpForBf16(lanes, out);
  return FloatToBFloat16(out[0]);
}

// Random scores with the specials a step must carry: -inf (masked keys), NaN, +inf, a row masked whole.
std::vector<float> SoftmaxScores(std::mt19937_64& rng, int iter, int64_t rows, int64_t cols, int64_t ld) {
  std::vector<float> scores = RandomValues(rng, rows * ld);
  for (float& x : scores) x *= static_cast<float>(Pick(rng, 1, 30));  // spread the probabilities' exponents
  const auto any = [&] { return Pick(rng, 0, rows - 1) * ld + Pick(rng, 0, cols - 1); };
  if (iter % 5 == 0) scores[any()] = -std::numeric_limits<float>::infinity();
  if (iter % 7 == 0) scores[any()] = std::nanf("");
  if (iter % 11 == 0) scores[any()] = std::numeric_limits<float>::infinity();
  if (iter % 13 == 0) std::fill_n(scores.begin(), cols, -std::numeric_limits<float>::infinity());
  return scores;
}

// Equal, or both NaN.
bool Same(float a, float b) { return a == b || (std::isnan(a) && std::isnan(b)); }

// The bf16 step against the f32 one: the same maxima and context rescaling (both from the maxima), sums within
// its exponentials' accuracy (3e-6) and two float summations' rounding; each probability bit for bit
// bf16(ExpNonPositiveForBf16Avx512(x - max)) rounded to nearest even (FloatToBFloat16), zero past the row's open
// keys, the pad column zero, nothing written past it.
TEST(FlashStripsBf16Test, SoftmaxStepIsTheF32StepWithItsProbabilitiesRoundedToNearestEven) {
  ASSERT_BF16_STRIPS_RUN_HERE();
  std::mt19937_64 rng(3);
  for (int iter = 0; iter < 300; ++iter) {
    const int64_t rows = Pick(rng, 1, kFlashStripRows), cols = Pick(rng, 1, 200), ld = cols + Pick(rng, 0, 9);
    const int64_t open0 = Pick(rng, 0, 2) == 0 ? Pick(rng, -rows, cols) : cols, acc_cols = Pick(rng, 1, 40);
    const int64_t cols2 = (cols + 1) / 2 * 2, ld16 = cols2 + 2 * Pick(rng, 0, 9);
    SCOPED_TRACE(::testing::Message() << "iter " << iter << " rows " << rows << " cols " << cols << " open0 " << open0);
    std::vector<float> scores = SoftmaxScores(rng, iter, rows, cols, ld);
    const std::vector<float> given = scores;
    SoftmaxState f32 = SoftmaxState::Draw(rng, rows, acc_cols), bf16 = f32;
    StripOnlineSoftmax(scores.data(), rows, cols, ld, open0, f32.row_max.data(), f32.row_sum.data(), f32.acc.data(),
                       acc_cols, acc_cols);
    std::vector<uint16_t> out(rows * ld16, kCanary16);
    StripOnlineSoftmaxBf16(given.data(), rows, cols, ld, open0, bf16.row_max.data(), bf16.row_sum.data(),
                           bf16.acc.data(), acc_cols, acc_cols, out.data(), ld16);
    EXPECT_EQ(bf16.row_max, f32.row_max);
    for (size_t i = 0; i < f32.acc.size(); ++i) ASSERT_TRUE(Same(bf16.acc[i], f32.acc[i])) << "acc " << i;
    for (int64_t r = 0; r < rows; ++r) {
      const float sum = f32.row_sum[r], max = bf16.row_max[r];
      if (!std::isnan(sum)) {
        EXPECT_NEAR(bf16.row_sum[r], sum, 6e-6 * std::abs(sum)) << "row " << r;
      }
      EXPECT_EQ(std::isnan(bf16.row_sum[r]), std::isnan(sum)) << "row " << r;
      const int64_t open = std::clamp<int64_t>(open0 + r, 0, cols);
      for (int64_t j = 0; j < ld16; ++j) {
        const bool seen = j < open && max != -std::numeric_limits<float>::infinity();
        const uint16_t want = seen ? ExpectedProbability(given[r * ld + j], max) : j < cols2 ? 0 : kCanary16;
        const uint16_t got = out[r * ld16 + j];
        ASSERT_TRUE(got == want || (std::isnan(Value(got)) && std::isnan(Value(want))))
            << "row " << r << " col " << j << ": " << got << " against " << want;
      }
    }
  }
}

TEST(FlashStripsBf16Test, ContextAddsToTheAccumulatorAsFloat64) {
  ASSERT_BF16_STRIPS_RUN_HERE();
  std::mt19937_64 rng(20261208);
  for (int iter = 0; iter < 400; ++iter) {
    const int64_t dh = iter < 128 ? iter + 1 : Pick(rng, 1, kFlashStripMaxHeadDim);
    const int64_t rows = Pick(rng, 1, kFlashStripRows), keys = Pick(rng, 1, 300);
    const int64_t k0 = Pick(rng, 0, (keys - 1) / 2) * 2, cols = Pick(rng, 1, keys - k0);
    const int64_t ld_v = dh + Pick(rng, 0, 40), ld_acc = dh + Pick(rng, 0, 20),
                  ld_p = (cols + 1) / 2 * 2 + 2 * Pick(rng, 0, 8);
    SCOPED_TRACE(::testing::Message() << "dh " << dh << " rows " << rows << " keys " << keys << " k0 " << k0 << " cols "
                                      << cols);
    std::vector<uint16_t> v = RandomBf16(rng, keys * ld_v);
    // An odd count's last pair holds a key past `cols`: its lanes must not be read (an inf there would make 0 x inf).
    if (cols % 2 != 0 && k0 + cols < keys) std::fill_n(v.begin() + (k0 + cols) * ld_v, dh, uint16_t{0x7F80});
    std::vector<float> probs_f32 = RandomValues(rng, rows * cols);
    std::vector<uint16_t> probs(rows * ld_p);  // the pad column zero
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) probs[r * ld_p + j] = FloatToBFloat16(probs_f32[r * cols + j]);
    }
    std::vector<uint16_t> pairs(PackedValuePairElems(keys, dh));
    PackValuePairs(v.data(), keys, ld_v, dh, pairs.data());
    std::vector<float> acc = RandomValues(rng, rows * ld_acc);
    const std::vector<float> before = acc;
    StripAddContextBf16(probs.data(), ld_p, rows, pairs.data(), k0, cols, dh, acc.data(), ld_acc);
    auto want = [&](int64_t r, int64_t d) {
      double sum = before[r * ld_acc + d];
      for (int64_t j = 0; j < cols; ++j) sum += Value(probs[r * ld_p + j]) * Value(v[(k0 + j) * ld_v + d]);
      return sum;
    };
    ASSERT_NO_FATAL_FAILURE(ExpectStripOutput(acc, rows, dh, ld_acc, 4e-5 * std::sqrt(static_cast<double>(cols)), want,
                                              [&](int64_t r, int64_t d) { return before[r * ld_acc + d]; }));
  }
}

TEST(FlashStripsBf16Test, HeadsWiderThanTheKernelsAreNotAvailable) {
  EXPECT_FALSE(FlashBf16StripsAvailable(0));
  EXPECT_FALSE(FlashBf16StripsAvailable(kFlashStripMaxHeadDim + 1));
}

}  // namespace
}  // namespace attnserve
