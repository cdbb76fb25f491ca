// The AVX-512 exponentials (core/exp_avx512.h) against float64's exp over the whole range they keep, [-87, 0],
// and at its edges: below -87 (and -inf) 0, NaN kept. Their accuracy bounds are what the softmax kernels document.
#include "core/exp_avx512.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "core/kernel_variants.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

enum class Variant { kFull, kForBf16 };

ATTN_AVX512 void Exp16(Variant variant, const float* x, float* out) {
  const __m512 v = _mm512_loadu_ps(x);
  _mm512_storeu_ps(out, variant == Variant::kFull ? ExpNonPositiveAvx512(v) : ExpNonPositiveForBf16Avx512(v));
}

std::vector<float> Exp(Variant variant, std::vector<float> x) {
  x.resize((x.size() + 15) / 16 * 16, 0.0f);
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); i += 16) Exp16(variant, x.data() + i, out.data() + i);
  return out;
}

// Every 2^-12 of [-87, 0] and 200,000 random points; the largest error relative to float64's exp of the same float.
double MaxRelativeError(Variant variant) {
  std::vector<float> x;
  for (double v = -87.0; v <= 0.0; v += 1.0 / 4096) x.push_back(static_cast<float>(v));
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<float> uniform(-87.0f, 0.0f);
  for (int i = 0; i < 200000; ++i) x.push_back(uniform(rng));
  const std::vector<float> got = Exp(variant, x);
  double worst = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = std::exp(static_cast<double>(x[i]));
    worst = std::max(worst, std::abs(got[i] - want) / want);
  }
  return worst;
}

class ExpAvx512Test : public ::testing::TestWithParam<Variant> {
 protected:
  void SetUp() override { ASSERT_EQ(PickedKernelIsa(), KernelIsa::kAvx512) << "no AVX-512 F here, or capped"; }
};

TEST_P(ExpAvx512Test, IsWithinItsBoundOfFloat64OverTheKeptRange) {
  const double bound = GetParam() == Variant::kFull ? 3e-7 : 3e-6;
  const double worst = MaxRelativeError(GetParam());
  EXPECT_LT(worst, bound);
  char shown[32];
  std::snprintf(shown, sizeof(shown), "%.3g", worst);
  RecordProperty("max_relative_error", shown);
}

TEST_P(ExpAvx512Test, FlushesBelowMinus87AndKeepsNaN) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const std::vector<float> got = Exp(GetParam(), {-87.5f, -100.0f, -1e30f, -kInf, std::nanf(""), -86.9f});
  for (int i = 0; i < 4; ++i) EXPECT_EQ(got[i], 0.0f) << i;
  EXPECT_TRUE(std::isnan(got[4]));
  EXPECT_GT(got[5], 0.0f);
}

INSTANTIATE_TEST_SUITE_P(Variants, ExpAvx512Test, ::testing::Values(Variant::kFull, Variant::kForBf16),
                         [](const auto& info) { return info.param == Variant::kFull ? "Full" : "ForBf16"; });

}  // namespace
}  // namespace attnserve
