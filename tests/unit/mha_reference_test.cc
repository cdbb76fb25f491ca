// The engine against the float64 naive reference over random shapes and mask combinations.
#include <random>

#include "core/multihead_attention.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

using testing::MaxAbsDiff;
using testing::RandomValues;

struct Case {
  MhaConfig config;
  int64_t batch, q_len, kv_len;
  bool unbatched, self_attention, is_causal, need_weights, average;
  int kpm, attn_mask;  // 0 none, 1 bool, 2 float
  bool attn_mask_3d;
  int64_t block_bytes;
};

Case DrawCase(std::mt19937_64& rng) {
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  Case c{};
  const int64_t heads = pick(1, 4);
  c.config.num_heads = heads;
  c.config.embed_dim = heads * pick(1, 12);
  c.config.bias = pick(0, 3) != 0;
  c.self_attention = pick(0, 1) == 0;
  if (!c.self_attention && pick(0, 1)) {
    c.config.kdim = pick(1, 20);
    c.config.vdim = pick(1, 20);
  }
  c.unbatched = pick(0, 5) == 0;
  c.batch = c.unbatched ? 1 : pick(1, 4);
  c.q_len = pick(1, 20);
  c.kv_len = c.self_attention ? c.q_len : pick(1, 20);
  c.is_causal = pick(0, 3) == 0;
  c.need_weights = pick(0, 1) == 1;
  c.average = pick(0, 1) == 1;
  c.kpm = static_cast<int>(pick(0, 2));
  c.attn_mask = static_cast<int>(pick(0, 2));
  c.attn_mask_3d = pick(0, 1) == 1;
  // Tiny score blocks in some cases force query blocking and one-sequence-per-call paths.
  c.block_bytes = pick(0, 2) == 0 ? 4 * pick(1, 64) : int64_t{2} << 20;
  return c;
}

// Random mask data: bool with ~30% masked, or float with some -inf.
struct MaskData {
  std::vector<uint8_t> bools;
  std::vector<float> floats;
  TensorView View(int type, Shape shape) const {
    return type == 1 ? TensorView::Bool(bools.data(), std::move(shape))
                     : TensorView::F32(floats.data(), std::move(shape));
  }
};

MaskData RandomMask(std::mt19937_64& rng, int64_t n) {
  MaskData m;
  std::uniform_real_distribution<float> u(0, 1);
  for (int64_t i = 0; i < n; ++i) {
    m.bools.push_back(u(rng) < 0.3f);
    const float r = u(rng);
    m.floats.push_back(r < 0.15f ? -std::numeric_limits<float>::infinity() : 4.0f * (r - 0.5f));
  }
  return m;
}

TEST(MhaReferenceTest, RandomShapesAndMasksMatchFloat64Reference) {
  std::mt19937_64 rng(20261127);
  int with_dead_rows = 0;
  for (int iter = 0; iter < 240; ++iter) {
    const Case c = DrawCase(rng);
    SCOPED_TRACE(::testing::Message() << "case " << iter << ": " << c.config.DebugString() << " B=" << c.batch
                                      << " L=" << c.q_len << " S=" << c.kv_len << " self=" << c.self_attention
                                      << " unbatched=" << c.unbatched << " causal=" << c.is_causal
                                      << " kpm=" << c.kpm << " attn_mask=" << c.attn_mask
                                      << (c.attn_mask_3d ? "(3d)" : "(2d)") << " block=" << c.block_bytes);
    const MhaWeights weights = testing::RandomTestWeights(c.config, rng);
    MultiheadAttention::Options options;
    options.config = c.config;
    options.scores_block_bytes = c.block_bytes;
    options.min_block_rows = 1;
    if (iter % 2) options.single_thread_below_flops = 0;  // also the multi-threaded paths
    auto layer = MultiheadAttention::Create(options, weights);
    ASSERT_TRUE(layer.ok()) << layer.status();

    const int64_t e = c.config.embed_dim, h = c.config.num_heads;
    auto batched = [&](Shape s) {
      if (!c.unbatched) s.insert(s.begin(), c.batch);
      return s;
    };
    const std::vector<float> query = RandomValues(rng, c.batch * c.q_len * e);
    const std::vector<float> key = RandomValues(rng, c.batch * c.kv_len * c.config.key_dim());
    const std::vector<float> value = RandomValues(rng, c.batch * c.kv_len * c.config.value_dim());
    const MaskData kpm = RandomMask(rng, c.batch * c.kv_len);
    const MaskData am = RandomMask(rng, c.batch * h * c.q_len * c.kv_len);

    AttentionInputs in;
    in.query = TensorView::F32(query.data(), batched({c.q_len, e}));
    if (!c.self_attention) {
      in.key = TensorView::F32(key.data(), batched({c.kv_len, c.config.key_dim()}));
      in.value = TensorView::F32(value.data(), batched({c.kv_len, c.config.value_dim()}));
    }
    if (c.kpm) in.key_padding_mask = kpm.View(c.kpm, batched({c.kv_len}));
    if (c.attn_mask) {
      in.attn_mask = am.View(c.attn_mask, c.attn_mask_3d ? Shape{c.batch * h, c.q_len, c.kv_len}
                                                         : Shape{c.q_len, c.kv_len});
    }
    in.is_causal = c.is_causal;
    in.need_weights = c.need_weights;
    in.average_attn_weights = c.average;

    auto got = (*layer)->Forward(in);
    ASSERT_TRUE(got.ok()) << got.status();
    const testing::NaiveOutputs want = testing::NaiveMultiheadAttention(c.config, weights, in);
    EXPECT_EQ(got->output.shape, batched({c.q_len, e}));
    EXPECT_LE(MaxAbsDiff(got->output.values, want.output), 2e-5);
    if (c.need_weights) {
      Shape ws = c.average ? Shape{c.q_len, c.kv_len} : Shape{h, c.q_len, c.kv_len};
      EXPECT_EQ(got->attn_weights.shape, batched(ws));
      EXPECT_LE(MaxAbsDiff(got->attn_weights.values, want.attn_weights), 1e-6);
    } else {
      EXPECT_TRUE(got->attn_weights.values.empty());
    }
    if (c.kpm || c.attn_mask) ++with_dead_rows;
  }
  EXPECT_GT(with_dead_rows, 50);
}

TEST(MhaReferenceTest, FullyMaskedRowGivesZeroWeightsAndBiasOutput) {
  std::mt19937_64 rng(7);
  MhaConfig config{16, 2, 0, 0, true};
  const MhaWeights weights = testing::RandomTestWeights(config, rng);
  MultiheadAttention::Options options;
  options.config = config;
  auto layer = MultiheadAttention::Create(options, weights);
  ASSERT_TRUE(layer.ok());
  const int64_t len = 5;
  const std::vector<float> query = RandomValues(rng, len * 16);
  std::vector<uint8_t> mask(len * len, 0);
  for (int64_t j = 0; j < len; ++j) mask[2 * len + j] = 1;  // query row 2 may attend nothing
  AttentionInputs in;
  in.query = TensorView::F32(query.data(), {len, 16});
  in.attn_mask = TensorView::Bool(mask.data(), {len, len});
  in.need_weights = true;
  auto got = (*layer)->Forward(in);
  ASSERT_TRUE(got.ok()) << got.status();
  for (int64_t j = 0; j < len; ++j) EXPECT_EQ(got->attn_weights.values[2 * len + j], 0.0f);
  for (int64_t d = 0; d < 16; ++d) EXPECT_FLOAT_EQ(got->output.values[2 * 16 + d], weights.out_proj_bias[d]);
  const testing::NaiveOutputs want = testing::NaiveMultiheadAttention(config, weights, in);
  EXPECT_LE(MaxAbsDiff(got->output.values, want.output), 2e-5);
}

}  // namespace
}  // namespace attnserve
