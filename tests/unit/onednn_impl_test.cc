// oneDNN 2.6 silently falls back to reference kernels (ref:*, ~1000x slower) for some shapes and layouts.
// Every primitive on the forward path must be a real one; this fails if any reports a ref: implementation.
// And the fixed-size bf16 block matmul, which exists only for brgemm kernels, is checked against a reference.
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "common/half_float.h"
#include "core/multihead_attention.h"
#include "core/onednn_ops.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_mha.h"
#include "tests/testing/bf16_brgemm.h"

namespace attnserve {
namespace {

// Runs masked, causal forwards with weights over several lengths; returns every primitive's impl.
std::vector<std::string> ImplsAfterForwards(const MhaConfig& config, int64_t single_thread_below_flops,
                                            ComputeType compute) {
  std::mt19937_64 rng(1);
  MultiheadAttention::Options options;
  options.config = config;
  options.single_thread_below_flops = single_thread_below_flops;
  options.scores_block_bytes = 8192;  // exercise query and head blocking too
  options.min_block_rows = 1;
  options.compute = compute;
  auto layer = MultiheadAttention::Create(options, testing::RandomTestWeights(config, rng));
  EXPECT_TRUE(layer.ok()) << layer.status();
  if (!layer.ok()) return {};
  for (int64_t len : {1, 7, 64, 200}) {
    const int64_t b = 2, e = config.embed_dim;
    const auto q = testing::RandomValues(rng, b * len * e);
    const auto k = testing::RandomValues(rng, b * len * config.key_dim());
    const auto v = testing::RandomValues(rng, b * len * config.value_dim());
    std::vector<uint8_t> mask(b * len, 0);
    AttentionInputs in;
    in.query = TensorView::F32(q.data(), {b, len, e});
    if (!config.same_qkv_dim()) {
      in.key = TensorView::F32(k.data(), {b, len, config.key_dim()});
      in.value = TensorView::F32(v.data(), {b, len, config.value_dim()});
    }
    in.key_padding_mask = TensorView::Bool(mask.data(), {b, len});
    in.is_causal = true;
    in.need_weights = true;
    EXPECT_TRUE((*layer)->Forward(in).ok());
  }
  return (*layer)->ImplementationsUsed();
}

// Both compute types (BFLOAT16's matmuls must be gemm:jit or brgemm, never ref:) and both thread paths:
// these small batches run single-threaded by default; threshold 0 runs them on every OpenMP thread
// (primitives are built per team size, so both sets are checked).
TEST(OnednnImplTest, NoReferenceKernelsOnTheForwardPath) {
  const int64_t thresholds[] = {MultiheadAttention::Options().single_thread_below_flops, 0};
  for (MhaConfig config : {MhaConfig{64, 4, 0, 0, true}, MhaConfig{48, 6, 20, 28, false}}) {
    for (ComputeType compute : {ComputeType::kFloat32, ComputeType::kBFloat16}) {
      for (int64_t threshold : thresholds) {
        const std::vector<std::string> impls = ImplsAfterForwards(config, threshold, compute);
        EXPECT_GE(impls.size(), 2u);
        std::string all;
        for (const std::string& impl : impls) {
          EXPECT_THAT(impl, ::testing::Not(::testing::StartsWith("ref"))) << config.DebugString();
          all += impl + " ";
        }
        std::cout << config.DebugString() << " compute=" << ComputeTypeName(compute)
                  << " single_thread_below_flops=" << threshold << ": " << all << "\n";
      }
    }
  }
}

// C = A . B (+ C) in float64 over the bf16 values of A and B: b is [k, n], or [n, k] when transpose_b.
std::vector<double> BlockReference(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b,
                                   const std::vector<float>& c0, int64_t m, int64_t n, int64_t k, bool transpose_b,
                                   bool accumulate) {
  std::vector<double> c(static_cast<size_t>(m * n));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double sum = accumulate ? c0[i * n + j] : 0.0;
      for (int64_t t = 0; t < k; ++t) {
        sum += double{BFloat16ToFloat(a[i * k + t])} * BFloat16ToFloat(transpose_b ? b[j * k + t] : b[t * n + j]);
      }
      c[i * n + j] = sum;
    }
  }
  return c;
}

// FlashAttention's whole bf16 blocks on brgemm kernels: scores (B given as K's rows) and the accumulating context, at
// the layers' 256 x 256 blocks (which must have brgemm kernels) and at odd sizes (which may not: Unimplemented),
// equal a float64 reference on the same bf16 values; without bf16 brgemm, Create is Unimplemented (the layer keeps its
// runtime-size matmuls).
TEST(OnednnImplTest, Bf16BlockMatmulEqualsTheReference) {
  struct Case {
    int64_t m, n, k;
    bool transpose_b, accumulate;
  };
  std::mt19937_64 rng(3);
  for (const Case& c : {Case{256, 256, 64, true, false}, Case{256, 64, 256, false, true}, Case{7, 40, 16, true, false},
                        Case{24, 20, 32, false, true}, Case{7, 40, 13, true, false}}) {
    const std::string what = ::testing::PrintToString(std::vector<int64_t>{c.m, c.n, c.k, c.transpose_b, c.accumulate});
    auto op = Bf16BlockMatmul::Create(c.m, c.n, c.k, c.transpose_b, c.accumulate);
    if (!OnednnHasBf16Brgemm()) {
      EXPECT_EQ(op.status().code(), absl::StatusCode::kUnimplemented) << what;
      continue;
    }
    if (c.m != 256 && absl::IsUnimplemented(op.status())) continue;  // odd sizes may have no brgemm kernel
    ASSERT_TRUE(op.ok()) << op.status() << " " << what;
    std::vector<uint16_t> a(static_cast<size_t>(c.m * c.k)), b(static_cast<size_t>(c.k * c.n));
    const std::vector<float> af = testing::RandomValues(rng, c.m * c.k), bf = testing::RandomValues(rng, c.k * c.n);
    for (size_t i = 0; i < a.size(); ++i) a[i] = FloatToBFloat16(af[i]);
    for (size_t i = 0; i < b.size(); ++i) b[i] = FloatToBFloat16(bf[i]);
    const std::vector<float> c0 = testing::RandomValues(rng, c.m * c.n);
    std::vector<float> got = c0;
    ASSERT_TRUE((*op)->Execute(a.data(), b.data(), got.data()).ok()) << what;
    EXPECT_LE(testing::MaxAbsDiff(got, BlockReference(a, b, c0, c.m, c.n, c.k, c.transpose_b, c.accumulate)), 1e-3)
        << what;
    EXPECT_THAT((*op)->Impls(), ::testing::Each(::testing::StartsWith(testing::ExpectedBf16Brgemm()))) << what;
  }
}

// Fixed-size matmuls keep their memory objects per thread and op (only the data handles change per call), at
// most 1024 ops' worth per thread, then start over. Batched ops (all heads of a sequence), 1,100 ops used in
// turn on one thread and then the first ones again: each call reads its own operands and writes its own C.
TEST(OnednnImplTest, FixedMatmulsKeepTheirOwnArgumentsPerThread) {
  if (!OnednnHasBf16Brgemm()) {
    EXPECT_EQ(Bf16BlockMatmul::Create(16, 16, 32, true, false, 3).status().code(), absl::StatusCode::kUnimplemented);
    return;
  }
  std::mt19937_64 rng(4);
  constexpr int64_t kBatch = 3, kM = 16, kN = 16, kK = 32;
  std::vector<std::unique_ptr<Bf16BlockMatmul>> ops;
  for (int i = 0; i < 1100; ++i) {
    auto op = Bf16BlockMatmul::Create(kM, kN, kK, /*transpose_b=*/i % 2 == 0, false, kBatch);
    ASSERT_TRUE(op.ok()) << op.status();
    ASSERT_EQ((*op)->batch(), kBatch);
    ops.push_back(std::move(*op));
  }
  auto run = [&](size_t i) {
    const bool transpose_b = i % 2 == 0;
    std::vector<uint16_t> a(kBatch * kM * kK), b(kBatch * kK * kN);
    const std::vector<float> af = testing::RandomValues(rng, a.size()), bf = testing::RandomValues(rng, b.size());
    for (size_t j = 0; j < a.size(); ++j) a[j] = FloatToBFloat16(af[j]);
    for (size_t j = 0; j < b.size(); ++j) b[j] = FloatToBFloat16(bf[j]);
    std::vector<float> got(kBatch * kM * kN, NAN);
    ASSERT_TRUE(ops[i]->Execute(a.data(), b.data(), got.data()).ok());
    for (int64_t t = 0; t < kBatch; ++t) {
      const std::vector<uint16_t> at(a.begin() + t * kM * kK, a.begin() + (t + 1) * kM * kK);
      const std::vector<uint16_t> bt(b.begin() + t * kK * kN, b.begin() + (t + 1) * kK * kN);
      const std::vector<float> ct(got.begin() + t * kM * kN, got.begin() + (t + 1) * kM * kN);
      ASSERT_LE(testing::MaxAbsDiff(ct, BlockReference(at, bt, std::vector<float>(kM * kN, 0.0f), kM, kN, kK,
                                                       transpose_b, false)),
                1e-3)
          << "op " << i << ", product " << t;
    }
  };
  for (size_t i = 0; i < ops.size(); ++i) run(i);
  for (size_t i = 0; i < 8; ++i) run(i);
}

}  // namespace
}  // namespace attnserve
