// oneDNN 2.6 silently falls back to reference kernels (ref:*, ~1000x slower) for some shapes and layouts.
// Every primitive on the forward path must be a real one; this fails if any reports a ref: implementation.
#include <random>

#include "core/multihead_attention.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

TEST(OnednnImplTest, NoReferenceKernelsOnTheForwardPath) {
  std::mt19937_64 rng(1);
  for (MhaConfig config : {MhaConfig{64, 4, 0, 0, true}, MhaConfig{48, 6, 20, 28, false}}) {
    MultiheadAttention::Options options;
    options.config = config;
    options.scores_block_bytes = 8192;  // exercise query and head blocking too
    options.min_block_rows = 1;
    auto layer = MultiheadAttention::Create(options, testing::RandomTestWeights(config, rng));
    ASSERT_TRUE(layer.ok());
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
      ASSERT_TRUE((*layer)->Forward(in).ok());
    }
    const std::vector<std::string> impls = (*layer)->ImplementationsUsed();
    EXPECT_GE(impls.size(), 2u);
    for (const std::string& impl : impls) {
      EXPECT_THAT(impl, ::testing::Not(::testing::StartsWith("ref"))) << config.DebugString();
    }
    std::string all;
    for (const auto& s : impls) all += s + " ";
    RecordProperty("impls", all);
    std::cout << config.DebugString() << ": " << all << "\n";
  }
}

}  // namespace
}  // namespace attnserve
