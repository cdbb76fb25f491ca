// oneDNN 2.6 silently falls back to reference kernels (ref:*, ~1000x slower) for some shapes and layouts.
// Every primitive on the forward path must be a real one; this fails if any reports a ref: implementation.
#include <random>

#include "core/multihead_attention.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_mha.h"

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

}  // namespace
}  // namespace attnserve
