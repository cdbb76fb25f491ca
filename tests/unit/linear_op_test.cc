// LinearOp's stacked and sliced forms, against a float64 reference: the fused Q/K/V projection built from its
// parts without a stacked copy, and Q, K and V as slices reading its weights in place; an f32 op's rows shared
// out in pieces over a team of threads, at any row count and stride.
#include <memory>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/half_float.h"
#include "core/multihead_attention.h"
#include "core/omp_threads.h"
#include "core/onednn_ops.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_mha.h"
#include "tests/testing/bf16_brgemm.h"

namespace attnserve {
namespace {

using testing::RandomValues;

std::vector<ComputeType> ComputeTypesHere() {
  if (OnednnBf16Support() == Bf16Support::kUnavailable) return {ComputeType::kFloat32};
  return {ComputeType::kFloat32, ComputeType::kBFloat16};
}

// What the op multiplies: the value itself in f32, its bf16 rounding in bf16.
double AsComputed(float x, ComputeType compute) {
  return compute == ComputeType::kBFloat16 ? BFloat16ToFloat(FloatToBFloat16(x)) : x;
}

// y [m, n] = x [m, k] . W^T + b in float64, W [n, k] rows of `rows` from row `row0`.
std::vector<double> Reference(const std::vector<float>& x, int64_t m, int64_t k, const std::vector<float>& w,
                              int64_t row0, int64_t n, const std::vector<float>& bias, ComputeType compute) {
  std::vector<double> y(static_cast<size_t>(m * n)), xd(static_cast<size_t>(m * k)), wd(static_cast<size_t>(n * k));
  for (size_t i = 0; i < xd.size(); ++i) xd[i] = AsComputed(x[i], compute);
  for (size_t i = 0; i < wd.size(); ++i) wd[i] = AsComputed(w[row0 * k + i], compute);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double sum = bias.empty() ? 0.0 : bias[j];
      for (int64_t t = 0; t < k; ++t) sum += xd[i * k + t] * wd[j * k + t];
      y[i * n + j] = sum;
    }
  }
  return y;
}

std::vector<float> Concat(const std::vector<std::vector<float>>& parts) {
  std::vector<float> all;
  for (const auto& p : parts) all.insert(all.end(), p.begin(), p.end());
  return all;
}

std::vector<float> Apply(const LinearOp& op, const std::vector<float>& x, int64_t m, int64_t k, int64_t n) {
  std::vector<float> y(static_cast<size_t>(m * n), -7.0f);
  const absl::Status status = op.Execute(x.data(), m, k, y.data(), n);
  EXPECT_TRUE(status.ok()) << status;
  return y;
}

// Parts of unequal heights, some not a multiple of any kernel block, stacked into one op.
TEST(LinearOpTest, StackedPartsEqualTheStackedMatrix) {
  std::mt19937_64 rng(11);
  const int64_t k = 40, m = 9;
  const std::vector<int64_t> heights = {24, 7, 40};
  std::vector<std::vector<float>> parts;
  for (int64_t h : heights) parts.push_back(RandomValues(rng, h * k));
  const std::vector<float> all = Concat(parts), bias = RandomValues(rng, 71), x = RandomValues(rng, m * k);
  for (ComputeType compute : ComputeTypesHere()) {
    auto op = LinearOp::CreateStacked(k, {&parts[0], &parts[1], &parts[2]}, bias, compute);
    ASSERT_TRUE(op.ok()) << op.status();
    EXPECT_LE(testing::MaxAbsDiff(Apply(**op, x, m, k, 71), Reference(x, m, k, all, 0, 71, bias, compute)), 1e-4);
    EXPECT_EQ((*op)->owned_weight_bytes(), 71 * k * (compute == ComputeType::kBFloat16 ? 2 : 4));
  }
}

// Each slice equals its part's own op; it holds no weights of its own and works after the whole op is gone
// (3 MiB of f32 weights: mapped on their own, so a read after they were freed faults in any build).
TEST(LinearOpTest, SlicesReadTheWholeOpsWeightsInPlace) {
  std::mt19937_64 rng(12);
  const int64_t k = 512, n = 512, m = 3;
  std::vector<std::vector<float>> parts = {RandomValues(rng, n * k), RandomValues(rng, n * k),
                                           RandomValues(rng, n * k)};
  const std::vector<float> all = Concat(parts), bias = RandomValues(rng, 3 * n), x = RandomValues(rng, m * k);
  for (ComputeType compute : ComputeTypesHere()) {
    auto whole = LinearOp::CreateStacked(k, {&parts[0], &parts[1], &parts[2]}, bias, compute);
    ASSERT_TRUE(whole.ok()) << whole.status();
    std::vector<std::unique_ptr<LinearOp>> slices;
    for (int64_t i = 0; i < 3; ++i) {
      const std::vector<float> part_bias(bias.begin() + i * n, bias.begin() + (i + 1) * n);
      auto slice = LinearOp::CreateSlice(**whole, i * n, n, part_bias);
      ASSERT_TRUE(slice.ok()) << slice.status();
      EXPECT_EQ((*slice)->owned_weight_bytes(), 0);
      slices.push_back(std::move(*slice));
    }
    whole->reset();  // the slices keep the weights alive (ASan checks the reads)
    for (int64_t i = 0; i < 3; ++i) {
      const std::vector<float> part_bias(bias.begin() + i * n, bias.begin() + (i + 1) * n);
      EXPECT_LE(
          testing::MaxAbsDiff(Apply(*slices[i], x, m, k, n), Reference(x, m, k, all, i * n, n, part_bias, compute)),
          1e-4)
          << "slice " << i << " " << ComputeTypeName(compute);
      EXPECT_THAT(slices[i]->Impls(), ::testing::Each(::testing::Not(::testing::StartsWith("ref"))));
    }
  }
}

// Rows of x [m, k] with row strides past k and n: an f32 op (k x n = 256 x 1536: 64 rows carry 50 MFLOP) shares
// 128 rows or more out in 64-row pieces over a team of threads through its single-thread primitive, built once
// beside the team's. Every row equals the reference, whatever the team and the last piece's height; the
// columns past n are not written. bf16 ops run whole.
TEST(LinearOpTest, RowsSharedOutInPiecesEqualTheReference) {
  std::mt19937_64 rng(15);
  const int64_t k = 256, n = 1536, ldx = k + 3, ldy = n + 5;
  const std::vector<float> w = RandomValues(rng, n * k), bias = RandomValues(rng, n);
  for (ComputeType compute : ComputeTypesHere()) {
    for (int64_t m : {int64_t{127}, int64_t{128}, int64_t{129}, int64_t{300}}) {
      const std::vector<float> x = RandomValues(rng, m * ldx);
      std::vector<float> packed;
      for (int64_t i = 0; i < m; ++i) packed.insert(packed.end(), x.begin() + i * ldx, x.begin() + i * ldx + k);
      const std::vector<double> want = Reference(packed, m, k, w, 0, n, bias, compute);
      for (int team : {1, 2, 3}) {
        const ScopedOmpThreads threads(team);  // the op builds its first primitive for the creating team
        auto op = LinearOp::Create(k, n, w, bias, compute);
        ASSERT_TRUE(op.ok()) << op.status();
        std::vector<float> y(static_cast<size_t>(m * ldy), -7.0f);
        const absl::Status status = (*op)->Execute(x.data(), m, ldx, y.data(), ldy);
        ASSERT_TRUE(status.ok()) << status << " " << ComputeTypeName(compute) << " team " << team << " m " << m;
        std::vector<float> got, past_n;
        for (int64_t i = 0; i < m; ++i) {
          got.insert(got.end(), y.begin() + i * ldy, y.begin() + i * ldy + n);
          past_n.insert(past_n.end(), y.begin() + i * ldy + n, y.begin() + (i + 1) * ldy);
        }
        const std::string what = absl::StrCat(ComputeTypeName(compute), " team ", team, " m ", m);
        EXPECT_LE(testing::MaxAbsDiff(got, want), 1e-3) << what;
        EXPECT_EQ(past_n, std::vector<float>(past_n.size(), -7.0f)) << what;
        if (compute == ComputeType::kFloat32) {  // bf16: whole, or in fixed-size pieces on brgemm (below)
          EXPECT_EQ((*op)->Impls().size(), team > 1 && m >= 128 ? 2u : 1u) << what;
        }
      }
    }
  }
  // An op whose 64 rows carry less than 32 MFLOP (256 x 768: 25 MFLOP, E=256's Q/K/V) runs whole.
  const ScopedOmpThreads two(2);
  const std::vector<float> w_small = RandomValues(rng, 768 * k), x = RandomValues(rng, 300 * k);
  auto small = LinearOp::Create(k, 768, w_small, {});
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_LE(testing::MaxAbsDiff(Apply(**small, x, 300, k, 768),
                                Reference(x, 300, k, w_small, 0, 768, {}, ComputeType::kFloat32)), 1e-3);
  EXPECT_EQ((*small)->Impls().size(), 1u);
}

// A bf16 op of whole blocks (k % 32, n % 64) where bf16 has brgemm kernels runs fixed-size brgemm primitives: row
// counts in powers of two up to 128, other counts through a padded copy, more rows in pieces of 128 in turn. Every row
// count, team and stride equals the reference, from f32 and from strided bf16 rows; columns past n are not written.
// Elsewhere the same op runs oneDNN's runtime-M kernel, and the same rows hold.
TEST(LinearOpTest, Bf16RowsInFixedPiecesEqualTheReference) {
  if (OnednnBf16Support() == Bf16Support::kUnavailable) GTEST_SKIP() << "no bf16 matmul on this CPU";
  std::mt19937_64 rng(16);
  const int64_t k = 256, n = 768, ldx = k + 7, ldy = n + 5;
  const std::vector<float> w = RandomValues(rng, n * k), bias = RandomValues(rng, n);
  for (int team : {1, 2}) {
    const ScopedOmpThreads threads(team);
    auto op = LinearOp::Create(k, n, w, bias, ComputeType::kBFloat16);
    ASSERT_TRUE(op.ok()) << op.status();
    for (int64_t m : {1, 2, 3, 16, 63, 64, 100, 127, 128, 129, 255, 300, 513, 700}) {
      const std::vector<float> x = RandomValues(rng, m * ldx);
      std::vector<float> packed;
      std::vector<uint16_t> x16(x.size());
      for (size_t i = 0; i < x.size(); ++i) x16[i] = FloatToBFloat16(x[i]);
      for (int64_t i = 0; i < m; ++i) packed.insert(packed.end(), x.begin() + i * ldx, x.begin() + i * ldx + k);
      const std::vector<double> want = Reference(packed, m, k, w, 0, n, bias, ComputeType::kBFloat16);
      for (bool from_bf16 : {false, true}) {
        std::vector<float> y(static_cast<size_t>(m * ldy), -7.0f);
        const absl::Status status = from_bf16 ? (*op)->ExecuteBf16(x16.data(), m, ldx, y.data(), ldy)
                                              : (*op)->Execute(x.data(), m, ldx, y.data(), ldy);
        const std::string what = absl::StrCat("team ", team, " m ", m, from_bf16 ? " from bf16" : " from f32");
        ASSERT_TRUE(status.ok()) << status << " " << what;
        std::vector<float> got, past_n;
        for (int64_t i = 0; i < m; ++i) {
          got.insert(got.end(), y.begin() + i * ldy, y.begin() + i * ldy + n);
          past_n.insert(past_n.end(), y.begin() + i * ldy + n, y.begin() + (i + 1) * ldy);
        }
        EXPECT_LE(testing::MaxAbsDiff(got, want), 1e-3) << what;
        EXPECT_EQ(past_n, std::vector<float>(past_n.size(), -7.0f)) << what;
      }
    }
    const std::vector<std::string> impls = (*op)->Impls();
    EXPECT_THAT(impls, ::testing::Each(::testing::Not(::testing::StartsWith("ref"))));
    if (OnednnHasBf16Brgemm()) {
      EXPECT_THAT(impls, ::testing::Each(::testing::StartsWith(testing::ExpectedBf16Brgemm())));
    }
  }
  // One block of outputs (E=256's Q, K or V slice and output projection are 4): on brgemm kernels too.
  auto narrow = LinearOp::Create(k, 64, std::vector<float>(w.begin(), w.begin() + 64 * k), {}, ComputeType::kBFloat16);
  ASSERT_TRUE(narrow.ok()) << narrow.status();
  const std::vector<float> x = RandomValues(rng, 128 * k);
  std::vector<float> y(128 * 64);
  ASSERT_TRUE((*narrow)->Execute(x.data(), 128, k, y.data(), 64).ok());
  EXPECT_LE(testing::MaxAbsDiff(y, Reference(x, 128, k, w, 0, 64, {}, ComputeType::kBFloat16)), 1e-3);
  if (OnednnHasBf16Brgemm()) {
    EXPECT_THAT((*narrow)->Impls(), ::testing::Contains(::testing::StartsWith(testing::ExpectedBf16Brgemm())));
  }
}

// A brgemm op over 4 MiB of weights (k <= 1024) runs in column panels of 1 MiB (here 4 of 512 outputs and one of
// 320), its (panel, rows) pieces shared over the team: every output column equals the reference, for one row, a
// padded piece and pieces of 128 rows, teams of 1 and 2; a slice of it over 4 MiB (panels of its own, starting
// one block in) reads its weights in place and equals the same columns. Elsewhere the same op runs oneDNN's
// runtime-M kernel.
TEST(LinearOpTest, Bf16OpInColumnPanelsEqualsTheReference) {
  if (OnednnBf16Support() == Bf16Support::kUnavailable) GTEST_SKIP() << "no bf16 matmul on this CPU";
  std::mt19937_64 rng(17);
  const int64_t k = 1024, n = 2368, ldy = n + 3, slice_begin = 64, slice_n = 2240;
  const std::vector<float> w = RandomValues(rng, n * k), bias = RandomValues(rng, n);
  const std::vector<float> slice_bias(bias.begin() + slice_begin, bias.begin() + slice_begin + slice_n);
  for (int64_t m : {1, 17, 513}) {
    const std::vector<float> x = RandomValues(rng, m * k);
    const std::vector<double> want = Reference(x, m, k, w, 0, n, bias, ComputeType::kBFloat16);
    for (int team : {1, 2}) {
      const ScopedOmpThreads threads(team);
      auto op = LinearOp::Create(k, n, w, bias, ComputeType::kBFloat16);
      ASSERT_TRUE(op.ok()) << op.status();
      auto slice = LinearOp::CreateSlice(**op, slice_begin, slice_n, slice_bias);
      ASSERT_TRUE(slice.ok()) << slice.status();
      EXPECT_EQ((*slice)->owned_weight_bytes(), 0);
      std::vector<float> y(static_cast<size_t>(m * ldy), -7.0f), y_slice(static_cast<size_t>(m * slice_n));
      ASSERT_TRUE((*op)->Execute(x.data(), m, k, y.data(), ldy).ok());
      ASSERT_TRUE((*slice)->Execute(x.data(), m, k, y_slice.data(), slice_n).ok());
      std::vector<float> got, past_n;
      std::vector<double> want_slice;
      for (int64_t i = 0; i < m; ++i) {
        got.insert(got.end(), y.begin() + i * ldy, y.begin() + i * ldy + n);
        past_n.insert(past_n.end(), y.begin() + i * ldy + n, y.begin() + (i + 1) * ldy);
        want_slice.insert(want_slice.end(), want.begin() + i * n + slice_begin,
                          want.begin() + i * n + slice_begin + slice_n);
      }
      const std::string what = absl::StrCat("team ", team, " m ", m);
      EXPECT_LE(testing::MaxAbsDiff(got, want), 2e-3) << what;
      EXPECT_LE(testing::MaxAbsDiff(y_slice, want_slice), 2e-3) << what;
      EXPECT_EQ(past_n, std::vector<float>(past_n.size(), -7.0f)) << what;
      if (OnednnHasBf16Brgemm()) {
        EXPECT_THAT((*op)->Impls(), ::testing::Contains(::testing::StartsWith(testing::ExpectedBf16Brgemm()))) << what;
      }
    }
  }
}

// bf16 outputs (ExecuteBf16ToBf16, what ShortAttention's groups project Q, K and V with): each the reference
// rounded to bf16 (within one bf16 step and the f32 sums' error), for one op of one panel and one in column
// panels, pieces of every kind (one row, padded, whole), teams of 1 and 2, a row stride past n left untouched.
// f32 ops, and bf16 ops off brgemm kernels, refuse it.
TEST(LinearOpTest, Bf16OutputsAreTheRoundedSums) {
  std::mt19937_64 rng(18);
  auto f32_op = LinearOp::Create(64, 64, RandomValues(rng, 64 * 64), {}, ComputeType::kFloat32);
  ASSERT_TRUE(f32_op.ok()) << f32_op.status();
  EXPECT_FALSE((*f32_op)->writes_bf16());
  std::vector<uint16_t> x16(64, 0), y16(64);
  EXPECT_TRUE(absl::IsFailedPrecondition((*f32_op)->ExecuteBf16ToBf16(x16.data(), 1, 64, y16.data(), 64)));
  if (OnednnBf16Support() == Bf16Support::kUnavailable) return;
  struct Shape {
    int64_t k, n;
  };
  for (const Shape& shape : {Shape{256, 768}, Shape{1024, 2368}}) {
    const int64_t k = shape.k, n = shape.n, ldy = n + 5;
    const std::vector<float> w = RandomValues(rng, n * k), bias = RandomValues(rng, n);
    auto op = LinearOp::Create(k, n, w, bias, ComputeType::kBFloat16);
    ASSERT_TRUE(op.ok()) << op.status();
    ASSERT_EQ((*op)->writes_bf16(), OnednnHasBf16Brgemm());
    if (!OnednnHasBf16Brgemm()) {
      EXPECT_TRUE(absl::IsFailedPrecondition((*op)->ExecuteBf16ToBf16(x16.data(), 1, 64, y16.data(), 64)));
      continue;
    }
    for (int64_t m : {1, 17, 128, 300}) {
      const std::vector<float> x = RandomValues(rng, m * k);
      std::vector<uint16_t> x_bf16(x.size());
      for (size_t i = 0; i < x.size(); ++i) x_bf16[i] = FloatToBFloat16(x[i]);
      const std::vector<double> want = Reference(x, m, k, w, 0, n, bias, ComputeType::kBFloat16);
      for (int team : {1, 2}) {
        const ScopedOmpThreads threads(team);
        std::vector<uint16_t> y(static_cast<size_t>(m * ldy), 0xABCD);
        const std::string what = absl::StrCat("k ", k, " n ", n, " m ", m, " team ", team);
        ASSERT_TRUE((*op)->ExecuteBf16ToBf16(x_bf16.data(), m, k, y.data(), ldy).ok()) << what;
        double worst = 0;  // in units of what the rounding allows
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < n; ++j) {
            const double got = BFloat16ToFloat(y[i * ldy + j]), ref = want[i * n + j];
            worst = std::max(worst, std::abs(got - ref) / (std::abs(ref) / 256 + 2e-3));
          }
          for (int64_t j = n; j < ldy; ++j) ASSERT_EQ(y[i * ldy + j], 0xABCD) << what << " wrote past n";
        }
        EXPECT_LE(worst, 1.0) << what;
        EXPECT_GT(worst, 0.0) << what << ": no rounding seen";
      }
    }
  }
}

TEST(LinearOpTest, BadShapesAreRefusedWithTheirSizes) {
  std::mt19937_64 rng(13);
  const std::vector<float> a = RandomValues(rng, 8 * 4), b = RandomValues(rng, 10);
  auto ragged = LinearOp::CreateStacked(4, {&a, &b}, {});
  ASSERT_FALSE(ragged.ok());
  EXPECT_THAT(std::string(ragged.status().message()), ::testing::HasSubstr("part 1 must be [n_1, 4]; got 10"));
  auto whole = LinearOp::CreateStacked(4, {&a}, {});
  ASSERT_TRUE(whole.ok()) << whole.status();
  for (auto [begin, n] : {std::pair<int64_t, int64_t>{-1, 2}, {0, 0}, {6, 3}}) {
    auto slice = LinearOp::CreateSlice(**whole, begin, n, {});
    EXPECT_EQ(slice.status().code(), absl::StatusCode::kInvalidArgument) << begin << " " << n;
  }
  EXPECT_EQ(LinearOp::CreateStacked(4, {}, {}).status().code(), absl::StatusCode::kInvalidArgument);
  auto bias_mismatch = LinearOp::CreateSlice(**whole, 0, 4, std::vector<float>(3, 1.0f));
  EXPECT_THAT(std::string(bias_mismatch.status().message()), ::testing::HasSubstr("3 bias values"));
}

// A self-attention layer holds its fused Q/K/V weights once (Q, K and V alone are slices of it) and the output
// projection: 4 E^2; a cross-attention layer with other key/value widths holds each projection apart.
TEST(LinearOpTest, LayersHoldEachWeightOnce) {
  std::mt19937_64 rng(14);
  for (ComputeType compute : ComputeTypesHere()) {
    const int64_t bytes = compute == ComputeType::kBFloat16 ? 2 : 4;
    MultiheadAttention::Options options;
    options.compute = compute;
    options.config = MhaConfig{64, 4, 0, 0, true};
    auto self = MultiheadAttention::Create(options, testing::RandomTestWeights(options.config, rng));
    ASSERT_TRUE(self.ok()) << self.status();
    EXPECT_EQ((*self)->weight_bytes(), 4 * 64 * 64 * bytes);
    options.config = MhaConfig{64, 4, 20, 28, true};
    auto cross = MultiheadAttention::Create(options, testing::RandomTestWeights(options.config, rng));
    ASSERT_TRUE(cross.ok()) << cross.status();
    EXPECT_EQ((*cross)->weight_bytes(), (64 * (64 + 20 + 28) + 64 * 64) * bytes);
  }
}

}  // namespace
}  // namespace attnserve
