// RowSoftmax against a float64 softmax: random rows of several scales and lengths, -inf entries, strides.
// SoftCapRows against float64 tanh.
// RowSoftmaxToBf16 against the same reference rounded to bf16 (within one bf16 step), dead rows zeroed: rows of up
// to 256 keys in registers on AVX-512, longer ones (and the AVX2 and baseline runs) through the general kernel.
#include "core/row_softmax.h"

#include <cmath>
#include <cstdlib>
#include <string>
#include <limits>
#include <random>
#include <vector>

#include "common/half_float.h"
#include "core/kernel_variants.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

// In float64 after x - max, which any float softmax rounds to float first (an error of up to |x - max| 2^-24
// in the exponent that no exp can take back).
std::vector<double> Reference(const float* row, int64_t cols) {
  float max = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < cols; ++j) max = std::max(max, row[j]);
  std::vector<double> out(cols);
  double sum = 0;
  for (int64_t j = 0; j < cols; ++j) sum += out[j] = std::exp(static_cast<double>(row[j] - max));
  for (double& v : out) v /= sum;
  return out;
}

// This binary also runs with ATTNSERVE_MAX_KERNEL_ISA=AVX2 and BASELINE (tests/CMakeLists.txt): the variant
// every kernel picks is the widest the CPU has within that cap.
TEST(KernelVariantsTest, PickFollowsTheCap) {
  const char* env = std::getenv("ATTNSERVE_MAX_KERNEL_ISA");
  const std::string cap = env == nullptr ? "" : env;
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  KernelIsa want = avx2 ? KernelIsa::kAvx2 : KernelIsa::kBaseline;
  if (__builtin_cpu_supports("avx512f")) want = KernelIsa::kAvx512;
  if (cap == "AVX2") want = avx2 ? KernelIsa::kAvx2 : KernelIsa::kBaseline;
  if (cap == "BASELINE") want = KernelIsa::kBaseline;
  EXPECT_EQ(PickedKernelIsa(), want) << "ATTNSERVE_MAX_KERNEL_ISA=" << cap;
}

TEST(KernelVariantsTest, CapValuesInAnyCaseOthersCapNothing) {
  const char* env = std::getenv("ATTNSERVE_MAX_KERNEL_ISA");
  const std::string saved = env == nullptr ? "" : env;
  const std::pair<const char*, KernelIsa> cases[] = {{"AVX2", KernelIsa::kAvx2}, {"avx2", KernelIsa::kAvx2},
                                                     {"Baseline", KernelIsa::kBaseline},
                                                     {"sse4", KernelIsa::kAvx512}, {"", KernelIsa::kAvx512}};
  for (const auto& [value, want] : cases) {
    setenv("ATTNSERVE_MAX_KERNEL_ISA", value, 1);
    EXPECT_EQ(MaxKernelIsa(), want) << value;
  }
  unsetenv("ATTNSERVE_MAX_KERNEL_ISA");
  EXPECT_EQ(MaxKernelIsa(), KernelIsa::kAvx512);
  if (env != nullptr) setenv("ATTNSERVE_MAX_KERNEL_ISA", saved.c_str(), 1);
}

TEST(RowSoftmaxTest, MatchesFloat64OnRandomRows) {
  std::mt19937_64 rng(1202);
  const float scales[] = {0.1f, 1.0f, 8.0f, 60.0f};  // 60: differences far past exp's float range
  for (int iter = 0; iter < 200; ++iter) {
    const int64_t rows = std::uniform_int_distribution<int64_t>(1, 6)(rng);
    const int64_t cols = std::uniform_int_distribution<int64_t>(1, 300)(rng);
    const int64_t ld = cols + std::uniform_int_distribution<int64_t>(0, 7)(rng);
    std::normal_distribution<float> normal(3.0f, scales[iter % 4]);
    std::vector<float> data(static_cast<size_t>(rows * ld), 123.0f);  // 123: the padding, left alone
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) data[r * ld + j] = normal(rng);
      if (cols > 1 && iter % 5 == 0) data[r * ld + cols - 1] = -std::numeric_limits<float>::infinity();
    }
    const std::vector<float> input = data;
    RowSoftmax(data.data(), rows, cols, ld);
    for (int64_t r = 0; r < rows; ++r) {
      const std::vector<double> want = Reference(input.data() + r * ld, cols);
      double sum = 0;
      for (int64_t j = 0; j < cols; ++j) {
        const float got = data[r * ld + j];
        sum += got;
        ASSERT_LE(std::abs(got - want[j]), 1e-6 * want[j] + 1e-30) << "iter " << iter << " row " << r << " col " << j;
        if (std::isinf(input[r * ld + j])) {
          ASSERT_EQ(got, 0.0f);
        }
      }
      EXPECT_NEAR(sum, 1.0, 1e-5);
      for (int64_t j = cols; j < ld; ++j) ASSERT_EQ(data[r * ld + j], 123.0f);
    }
  }
}

// SoftCapRows against cap * tanh(x / cap) in float64: random rows of scores around the cap and far from it (both
// sides of the series' 1/4 and tiny values, whose relative error the series keeps), strided, the padding untouched;
// +-inf to +-cap, NaN kept, 0 stays 0.
TEST(SoftCapRowsTest, MatchesFloat64Tanh) {
  std::mt19937_64 rng(1207);
  const float scales[] = {1e-3f, 0.3f, 5.0f, 60.0f};
  double worst = 0;
  for (int iter = 0; iter < 200; ++iter) {
    const int64_t rows = std::uniform_int_distribution<int64_t>(1, 6)(rng);
    const int64_t cols = std::uniform_int_distribution<int64_t>(1, 300)(rng);
    const int64_t ld = cols + std::uniform_int_distribution<int64_t>(0, 7)(rng);
    const float cap = std::uniform_real_distribution<float>(0.5f, 50.0f)(rng);
    std::normal_distribution<float> normal(0.0f, scales[iter % 4] * cap);
    std::vector<float> data(static_cast<size_t>(rows * ld), 123.0f);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) data[r * ld + j] = normal(rng);
    }
    const std::vector<float> input = data;
    SoftCapRows(data.data(), rows, cols, ld, cap);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) {
        const double want = cap * std::tanh(static_cast<double>(input[r * ld + j]) / cap);
        const double err = std::abs(data[r * ld + j] - want) / std::max(std::abs(want), 1e-30);
        worst = std::max(worst, err);
        ASSERT_LE(err, 5e-7) << "iter " << iter << " x " << input[r * ld + j] << " cap " << cap;
      }
      for (int64_t j = cols; j < ld; ++j) ASSERT_EQ(data[r * ld + j], 123.0f);
    }
  }
  RecordProperty("worst_relative_error", ::testing::PrintToString(worst));
  // The top of the series' range, where its last term counts most (3.4e-7 at 1/4 without it): 2 steps of float.
  for (float t = 0.2f; t < 0.25f; t += 1e-4f) {
    for (float sign : {1.0f, -1.0f}) {
      float x = sign * t;
      SoftCapRows(&x, 1, 1, 1, 1.0f);
      const double want = std::tanh(static_cast<double>(sign * t));
      ASSERT_LE(std::abs(x - want), 2.5e-7 * std::abs(want)) << "t " << sign * t;
    }
  }
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> edges = {inf, -inf, std::numeric_limits<float>::quiet_NaN(), 0.0f, -0.0f, 1e-30f, 1e30f};
  SoftCapRows(edges.data(), 1, static_cast<int64_t>(edges.size()), static_cast<int64_t>(edges.size()), 30.0f);
  EXPECT_EQ(edges[0], 30.0f);
  EXPECT_EQ(edges[1], -30.0f);
  EXPECT_TRUE(std::isnan(edges[2]));
  EXPECT_EQ(edges[3], 0.0f);
  EXPECT_EQ(edges[4], 0.0f);
  EXPECT_FALSE(std::signbit(edges[3]));
  EXPECT_TRUE(std::signbit(edges[4]));
  EXPECT_NEAR(edges[5], 1e-30f, 1e-36f);
  EXPECT_EQ(edges[6], 30.0f);
}

TEST(RowSoftmaxTest, ExtremeValues) {
  std::vector<float> row = {0.0f, -86.9f, -87.1f, -1000.0f, -std::numeric_limits<float>::infinity(), 1e30f};
  RowSoftmax(row.data(), 1, static_cast<int64_t>(row.size()), static_cast<int64_t>(row.size()));
  EXPECT_EQ(row[5], 1.0f);  // everything else is at least 1e30 below it
  for (int j = 0; j < 5; ++j) EXPECT_EQ(row[j], 0.0f) << j;
  // Around the cutoff: exp(-86.9) is still a normal float, exp(-87.1) becomes 0; NaN stays NaN.
  std::vector<float> cutoff = {0.0f, -86.9f, -87.1f, -1000.0f, -std::numeric_limits<float>::infinity()};
  RowSoftmax(cutoff.data(), 1, 5, 5);
  const double want = std::exp(static_cast<double>(-86.9f));  // over a sum of 1 + that
  EXPECT_NEAR(cutoff[1], want, 1e-6 * want);
  EXPECT_GT(cutoff[1], 0.0f);
  for (int j = 2; j < 5; ++j) EXPECT_EQ(cutoff[j], 0.0f) << j;
  std::vector<float> nan = {0.0f, std::numeric_limits<float>::quiet_NaN(), -1.0f};
  RowSoftmax(nan.data(), 1, 3, 3);
  EXPECT_TRUE(std::isnan(nan[1]));
  std::vector<float> same(37, -5.0f);
  RowSoftmax(same.data(), 1, 37, 37);
  for (float v : same) EXPECT_NEAR(v, 1.0f / 37, 1e-7f);
}

TEST(RowSoftmaxTest, Bf16OutputIsTheRoundedSoftmax) {
  std::mt19937_64 rng(1203);
  // Up to 256 keys in registers on AVX-512 (row_softmax_avx512.h), whole vectors and a masked last one; past that
  // the general kernel.
  for (int64_t cols : {1, 5, 16, 17, 64, 100, 255, 256, 257, 513}) {
    const int64_t rows = 4, ld = cols + 3, ld_out = cols + 2;
    std::normal_distribution<float> n(0.0f, 4.0f);
    std::vector<float> data(rows * ld);
    for (float& x : data) x = n(rng);
    if (cols > 1) data[ld] = -std::numeric_limits<float>::infinity();  // a masked key in row 1
    const std::vector<float> original = data;
    const std::vector<uint8_t> dead = {0, 0, 1, 0};
    std::vector<uint16_t> out(rows * ld_out, 0xABCD);
    RowSoftmaxToBf16(data.data(), rows, cols, ld, dead.data(), out.data(), ld_out);
    for (int64_t r = 0; r < rows; ++r) {
      const std::vector<double> want = Reference(original.data() + r * ld, cols);
      for (int64_t j = 0; j < cols; ++j) {
        const float got = BFloat16ToFloat(out[r * ld_out + j]);
        if (dead[r]) {
          EXPECT_EQ(got, 0.0f);
        } else {
          // Round-to-nearest of a value within 1e-6 relative: at most one bf16 step (2^-8 relative) away.
          EXPECT_NEAR(got, want[j], want[j] * (1.0 / 256) + 1e-30) << r << "," << j;
        }
      }
      EXPECT_EQ(out[r * ld_out + cols], 0xABCD) << "wrote past the row";
    }
    if (cols > 1) {
      EXPECT_EQ(BFloat16ToFloat(out[ld_out]), 0.0f);  // exp(-inf) is exactly 0
    }
  }
}

// The bf16 softmax's edges, on rows short enough for the register kernel and past it (300 keys): exp(x - max)
// above -87 is kept, below it (and -inf) exactly 0; NaN makes the row NaN; equal scores share the weight evenly.
TEST(RowSoftmaxTest, Bf16OutputsKeepTheEdges) {
  for (int64_t cols : {int64_t{5}, int64_t{300}}) {
    std::vector<float> cutoff(static_cast<size_t>(cols), -std::numeric_limits<float>::infinity());
    cutoff[0] = 0.0f;
    cutoff[1] = -86.9f;
    cutoff[2] = -87.1f;
    cutoff[3] = -1000.0f;
    std::vector<float> nan(static_cast<size_t>(cols), -1.0f), same(static_cast<size_t>(cols), -5.0f);
    nan[1] = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> rows = cutoff;
    rows.insert(rows.end(), nan.begin(), nan.end());
    rows.insert(rows.end(), same.begin(), same.end());
    std::vector<uint16_t> out(rows.size());
    RowSoftmaxToBf16(rows.data(), 3, cols, cols, nullptr, out.data(), cols);
    EXPECT_EQ(BFloat16ToFloat(out[0]), 1.0f) << cols;
    EXPECT_GT(BFloat16ToFloat(out[1]), 0.0f) << cols << ": exp(-86.9) is a normal float";
    for (int64_t j = 2; j < cols; ++j) EXPECT_EQ(BFloat16ToFloat(out[j]), 0.0f) << cols << "," << j;
    for (int64_t j = 0; j < cols; ++j) EXPECT_TRUE(std::isnan(BFloat16ToFloat(out[cols + j]))) << cols << "," << j;
    const float even = BFloat16ToFloat(FloatToBFloat16(1.0f / static_cast<float>(cols)));
    for (int64_t j = 0; j < cols; ++j) EXPECT_EQ(BFloat16ToFloat(out[2 * cols + j]), even) << cols << "," << j;
  }
}

}  // namespace
}  // namespace attnserve
