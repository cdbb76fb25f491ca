// The flash-style path (core/flash_attention.h) through MultiheadAttention: against the float64 naive
// reference and the blocked path, over random shapes, block sizes that cut rows and keys unevenly, causal
// and not, self- and cross-attention, random masks of every kind, one thread and several; which requests it
// takes; stops between blocks; grouped kv heads against repeated ones.
#include "core/flash_attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/half_float.h"
#include "core/flash_strips_avx512.h"
#include "core/multihead_attention.h"
#include "core/onednn_ops.h"
#include "core/row_softmax.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

using testing::MaxAbsDiff;
using testing::RandomValues;

struct FlashCase {
  MhaConfig config;
  int64_t batch, q_len, kv_len, query_rows, key_cols;
  bool self_attention, is_causal;
};

FlashCase DrawFlashCase(std::mt19937_64& rng, int64_t min_head_dim = 1, int64_t max_head_dim = 20) {
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  FlashCase c{};
  c.config.num_heads = pick(1, 4);
  c.config.embed_dim = c.config.num_heads * pick(min_head_dim, max_head_dim);
  c.config.bias = pick(0, 3) != 0;
  c.self_attention = pick(0, 2) != 0;
  c.batch = pick(1, 3);
  c.q_len = pick(1, 90);
  c.kv_len = c.self_attention ? c.q_len : pick(1, 90);
  c.is_causal = pick(0, 1) == 1;
  c.query_rows = pick(1, 24);
  c.key_cols = pick(1, 40);
  return c;
}

// Options that send every unmasked request without weights through FlashAttention, with `c`'s blocks.
MultiheadAttention::Options FlashOptions(const FlashCase& c) {
  MultiheadAttention::Options options;
  options.config = c.config;
  options.small_attention_flops = 0;  // every request is "large": attended whole, not cut into units
  options.single_thread_below_flops = 0;
  options.flash_min_keys = 1;
  options.flash_query_rows = c.query_rows;
  options.flash_key_cols = c.key_cols;
  return options;
}

// Runs `in` (need_weights false) through the flash path with c's blocks and through the blocked path of the
// same layer (flash_min_keys = 0), on `threads` threads (0: all), computing in `compute`; expects both within
// `tolerance` of the float64 reference and of each other, and no weights.
void ExpectFlashMatchesReferenceAndBlocked(const FlashCase& c, const MhaWeights& weights, const AttentionInputs& in,
                                           int threads, ComputeType compute = ComputeType::kFloat32,
                                           double tolerance = 2e-5) {
  MultiheadAttention::Options options = FlashOptions(c);
  options.compute = compute;
  auto flash = MultiheadAttention::Create(options, weights);
  ASSERT_TRUE(flash.ok()) << flash.status();
  options.flash_min_keys = 0;
  auto blocked = MultiheadAttention::Create(options, weights);
  ASSERT_TRUE(blocked.ok()) << blocked.status();
  auto got = (*flash)->Forward(in, threads);
  ASSERT_TRUE(got.ok()) << got.status();
  auto other = (*blocked)->Forward(in, threads);
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_LE(MaxAbsDiff(got->output.values, testing::NaiveMultiheadAttention(c.config, weights, in).output),
            tolerance);
  EXPECT_LE(MaxAbsDiff(got->output.values, other->output.values), tolerance);
  for (const std::string& impl : (*flash)->ImplementationsUsed()) {
    EXPECT_EQ(impl.find("ref"), std::string::npos) << impl;  // oneDNN's reference kernels: ~1000x slower
  }
  EXPECT_TRUE(got->attn_weights.values.empty());
}

// `iterations` random cases (DrawFlashCase) through ExpectFlashMatchesReferenceAndBlocked.
void ExpectRandomShapesMatch(uint64_t seed, int iterations, ComputeType compute, double tolerance) {
  std::mt19937_64 rng(seed);
  for (int iter = 0; iter < iterations; ++iter) {
    const FlashCase c = DrawFlashCase(rng);
    SCOPED_TRACE(::testing::Message() << "case " << iter << ": " << c.config.DebugString() << " B=" << c.batch
                                      << " L=" << c.q_len << " S=" << c.kv_len << " self=" << c.self_attention
                                      << " causal=" << c.is_causal << " blocks " << c.query_rows << "x"
                                      << c.key_cols);
    const MhaWeights weights = testing::RandomTestWeights(c.config, rng);
    const int64_t e = c.config.embed_dim;
    const std::vector<float> query = RandomValues(rng, c.batch * c.q_len * e);
    const std::vector<float> key = RandomValues(rng, c.batch * c.kv_len * e);
    const std::vector<float> value = RandomValues(rng, c.batch * c.kv_len * e);
    AttentionInputs in;
    in.query = TensorView::F32(query.data(), {c.batch, c.q_len, e});
    if (!c.self_attention) {
      in.key = TensorView::F32(key.data(), {c.batch, c.kv_len, e});
      in.value = TensorView::F32(value.data(), {c.batch, c.kv_len, e});
    }
    in.is_causal = c.is_causal;
    in.need_weights = false;
    ExpectFlashMatchesReferenceAndBlocked(c, weights, in, iter % 3 == 0 ? 1 : 0, compute, tolerance);
  }
}

TEST(FlashAttentionTest, RandomShapesMatchFloat64ReferenceAndBlockedPath) {
  ExpectRandomShapesMatch(20261203, 150, ComputeType::kFloat32, 2e-5);
}

// BFLOAT16 layers: the block matmuls in bf16 (the layer's primitives on its bf16 copies of Q, K and V), within
// the bf16 bound of the golden tests (3e-2 for unit-variance inputs) of the float64 reference and of the
// blocked bf16 path. (A CPU without a bf16 matmul computes these layers in f32.)
TEST(FlashAttentionTest, Bf16RandomShapesMatchFloat64ReferenceAndBlockedPath) {
  ExpectRandomShapesMatch(20261204, 60, ComputeType::kBFloat16, 3e-2);
}

// Long enough for the default blocks (the CPU's: 128 x 256 or 512 x 512) to cut rows and keys, with a ragged
// last block each way.
TEST(FlashAttentionTest, DefaultBlocksOnALongCausalSequence) {
  std::mt19937_64 rng(7);
  MhaConfig config{128, 4, 0, 0, true};
  const MhaWeights weights = testing::RandomTestWeights(config, rng);
  MultiheadAttention::Options options;
  options.config = config;
  options.flash_min_keys = 512;
  auto layer = MultiheadAttention::Create(options, weights);
  ASSERT_TRUE(layer.ok()) << layer.status();
  const auto [cpu_rows, cpu_keys] = FlashBlockForCpu();
  EXPECT_TRUE((cpu_rows == 128 && cpu_keys == 256) || (cpu_rows == 512 && cpu_keys == 512));
  EXPECT_EQ((*layer)->options().flash_query_rows, cpu_rows);
  EXPECT_EQ((*layer)->options().flash_key_cols, cpu_keys);
  const int64_t len = 700;
  const std::vector<float> query = RandomValues(rng, len * config.embed_dim);
  for (bool causal : {true, false}) {
    AttentionInputs in;
    in.query = TensorView::F32(query.data(), {1, len, config.embed_dim});
    in.is_causal = causal;
    auto got = (*layer)->Forward(in);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_LE(MaxAbsDiff(got->output.values, testing::NaiveMultiheadAttention(config, weights, in).output), 2e-5)
        << "causal " << causal;
  }
}

// A BFLOAT16 layer with bf16 brgemm kernels takes 256 x 256 flash blocks, whole ones on brgemm kernels
// (Bf16BlockMatmul, from dense bf16 copies), ragged and causal-diagonal ones on its runtime-size matmuls: L=700 has
// both kinds each way. Within the bf16 bound of the float64 reference and of the blocked path, with and without a float
// key padding mask that masks a whole block of keys (skipped) and scattered keys. With flash_strips, where the bf16
// strip kernels run (AVX512_BF16 without AMX) they take every block instead, and the brgemm blocks none.
void ExpectBf16FlashBlocksMatchTheReference(bool strips) {
  std::mt19937_64 rng(9);
  MhaConfig config{256, 4, 0, 0, true};
  const MhaWeights weights = testing::RandomTestWeights(config, rng);
  MultiheadAttention::Options options;
  options.config = config;
  options.compute = ComputeType::kBFloat16;
  options.flash_min_keys = 512;
  options.flash_strips = strips;
  auto flash = MultiheadAttention::Create(options, weights);
  ASSERT_TRUE(flash.ok()) << flash.status();
  options.flash_min_keys = 0;
  auto blocked = MultiheadAttention::Create(options, weights);
  ASSERT_TRUE(blocked.ok()) << blocked.status();
  EXPECT_EQ((*flash)->flash_blocks_on_brgemm(), OnednnHasBf16Brgemm());
  if (OnednnHasBf16Brgemm()) {
    EXPECT_EQ((*flash)->options().flash_query_rows, 256);
  }
  const int64_t b = 2, len = 700;
  const std::vector<float> query = RandomValues(rng, b * len * config.embed_dim);
  std::vector<float> padding(static_cast<size_t>(b * len), 0.0f);
  std::uniform_real_distribution<float> bias(-1.0f, 1.0f);
  for (int64_t j = 0; j < len; ++j) padding[len + j] = j < 256 ? -INFINITY : j % 5 == 0 ? bias(rng) : 0.0f;
  for (bool causal : {false, true}) {
    for (bool masked : {false, true}) {
      AttentionInputs in;
      in.query = TensorView::F32(query.data(), {b, len, config.embed_dim});
      in.is_causal = causal;
      in.need_weights = false;
      if (masked) in.key_padding_mask = TensorView::F32(padding.data(), {b, len});
      auto got = (*flash)->Forward(in);
      ASSERT_TRUE(got.ok()) << got.status();
      auto other = (*blocked)->Forward(in);
      ASSERT_TRUE(other.ok()) << other.status();
      const std::string what = ::testing::PrintToString(std::vector<bool>{causal, masked});
      EXPECT_LE(MaxAbsDiff(got->output.values, testing::NaiveMultiheadAttention(config, weights, in).output), 3e-2)
          << what;
      EXPECT_LE(MaxAbsDiff(got->output.values, other->output.values), 3e-2) << what;
    }
  }
  const bool on_strips = strips && FlashBf16OnStrips(config.head_dim());
  EXPECT_EQ((*flash)->flash_brgemm_block_matmuls() > 0, OnednnHasBf16Brgemm() && !on_strips);
}

TEST(FlashAttentionTest, Bf16WholeBrgemmBlocksMatchTheReference) {
  if (OnednnBf16Support() == Bf16Support::kUnavailable) GTEST_SKIP() << "no bf16 matmul on this CPU";
  ExpectBf16FlashBlocksMatchTheReference(false);
}

TEST(FlashAttentionTest, Bf16StripKernelsMatchTheReference) {
  if (OnednnBf16Support() == Bf16Support::kUnavailable) GTEST_SKIP() << "no bf16 matmul on this CPU";
  ExpectBf16FlashBlocksMatchTheReference(true);
}

// Block matmuls of other sizes than the blocks are refused, not run out of bounds.
TEST(FlashAttentionTest, Bf16BlockMatmulsOfOtherSizesAreRefused) {
  if (!OnednnHasBf16Brgemm()) GTEST_SKIP() << "no bf16 brgemm kernels on this CPU";
  auto scores = Bf16BlockMatmul::Create(256, 256, 64, true, false);
  auto context = Bf16BlockMatmul::Create(256, 64, 256, false, true);
  auto scores_op = HeadMatmulOp::Create(HeadMatmulOp::Kind::kScores, 64, ComputeType::kBFloat16);
  auto context_op = HeadMatmulOp::Create(HeadMatmulOp::Kind::kContextAdd, 64, ComputeType::kBFloat16);
  ASSERT_TRUE(scores.ok() && context.ok() && scores_op.ok() && context_op.ok());
  FlashAttentionArgs a;
  a.batch = a.heads = 1;
  a.q_len = a.kv_len = 4;
  a.head_dim = 64;
  a.query_rows = 128;
  a.key_cols = 256;
  a.bf16.scores_op = scores_op->get();
  a.bf16.context_add_op = context_op->get();
  a.bf16.block_scores = scores->get();
  a.bf16.block_context = context->get();
  const absl::Status refused = FlashAttention(a, 1, [] { return absl::OkStatus(); });
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.message()), ::testing::HasSubstr("must be [128, 256] x 64"));
}

// The masks a request may carry, drawn: key_padding_mask and attn_mask (2-D or per head), bool or float,
// with some query rows whose keys are all masked (their context is zero on both paths).
struct DrawnMasks {
  std::vector<uint8_t> padding_bool, attn_bool;
  std::vector<float> padding_float, attn_float;

  void Draw(std::mt19937_64& rng, const FlashCase& c, AttentionInputs* in) {
    auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
    const int64_t heads = c.config.num_heads;
    std::uniform_real_distribution<float> bias(-2.0f, 2.0f);
    const int padding_kind = static_cast<int>(pick(0, 2));  // none, bool, float
    if (padding_kind == 1) {
      padding_bool.resize(c.batch * c.kv_len);
      for (auto& m : padding_bool) m = pick(0, 3) == 0;
      padding_bool[0] = 0;
      if (c.batch > 1) std::fill_n(padding_bool.begin() + c.kv_len, c.kv_len, 1);  // sequence 1: all masked
      in->key_padding_mask = TensorView::Bool(padding_bool.data(), {c.batch, c.kv_len});
    } else if (padding_kind == 2) {
      padding_float.resize(c.batch * c.kv_len);
      for (auto& m : padding_float) m = pick(0, 4) == 0 ? -std::numeric_limits<float>::infinity() : bias(rng);
      in->key_padding_mask = TensorView::F32(padding_float.data(), {c.batch, c.kv_len});
    }
    const int attn_kind = static_cast<int>(pick(0, 4));  // none, 2-D bool, 2-D float, per-head bool, per-head float
    if (attn_kind == 0) return;
    const bool per_head = attn_kind >= 3, as_bool = attn_kind % 2 == 1;
    Shape shape = per_head ? Shape{c.batch * heads, c.q_len, c.kv_len} : Shape{c.q_len, c.kv_len};
    const int64_t n = (per_head ? c.batch * heads : 1) * c.q_len * c.kv_len;
    if (as_bool) {
      attn_bool.resize(n);
      for (auto& m : attn_bool) m = pick(0, 3) == 0;
      std::fill_n(attn_bool.begin(), c.kv_len, 1);  // query 0 (of head 0): every key masked
      in->attn_mask = TensorView::Bool(attn_bool.data(), std::move(shape));
    } else {
      attn_float.resize(n);
      for (auto& m : attn_float) m = pick(0, 4) == 0 ? -std::numeric_limits<float>::infinity() : bias(rng);
      in->attn_mask = TensorView::F32(attn_float.data(), std::move(shape));
    }
  }
};

// Masked requests take the flash path too: the masks go in block by block, against the float64 reference
// and the blocked path (which builds whole masked score rows).
void ExpectRandomMasksMatch(uint64_t seed, int iterations, int64_t min_head_dim, int64_t max_head_dim,
                            ComputeType compute = ComputeType::kFloat32, double tolerance = 2e-5) {
  std::mt19937_64 rng(seed);
  for (int iter = 0; iter < iterations; ++iter) {
    const FlashCase c = DrawFlashCase(rng, min_head_dim, max_head_dim);
    AttentionInputs in;
    DrawnMasks masks;
    masks.Draw(rng, c, &in);
    SCOPED_TRACE(::testing::Message() << "case " << iter << ": " << c.config.DebugString() << " B=" << c.batch
                                      << " L=" << c.q_len << " S=" << c.kv_len << " causal=" << c.is_causal
                                      << " blocks " << c.query_rows << "x" << c.key_cols << " padding "
                                      << in.key_padding_mask.shape.size() << " attn_mask dims "
                                      << in.attn_mask.shape.size());
    const MhaWeights weights = testing::RandomTestWeights(c.config, rng);
    const int64_t e = c.config.embed_dim;
    const std::vector<float> query = RandomValues(rng, c.batch * c.q_len * e);
    const std::vector<float> key = RandomValues(rng, c.batch * c.kv_len * e);
    in.query = TensorView::F32(query.data(), {c.batch, c.q_len, e});
    if (!c.self_attention) in.key = in.value = TensorView::F32(key.data(), {c.batch, c.kv_len, e});
    in.is_causal = c.is_causal;
    in.need_weights = false;
    ExpectFlashMatchesReferenceAndBlocked(c, weights, in, iter % 3 == 0 ? 1 : 0, compute, tolerance);
  }
}

TEST(FlashAttentionTest, RandomMasksMatchFloat64ReferenceAndBlockedPath) {
  ExpectRandomMasksMatch(20261204, 150, 1, 20);
}

// Heads of 17-130 dims: every register count of the strip kernels' context tiles (up to 8), and past them (sgemm),
// with masks, cross-attention, causal over unequal lengths and several threads.
TEST(FlashAttentionTest, WideHeadsWithMasksMatchFloat64ReferenceAndBlockedPath) {
  ExpectRandomMasksMatch(20261209, 40, 17, 130);
}

// The same for BFLOAT16 layers (on the bf16 strip kernels where they run), within the bf16 bound.
TEST(FlashAttentionTest, Bf16MasksAndWideHeadsMatchFloat64ReferenceAndBlockedPath) {
  if (OnednnBf16Support() == Bf16Support::kUnavailable) GTEST_SKIP() << "no bf16 matmul on this CPU";
  ExpectRandomMasksMatch(20261210, 40, 1, 130, ComputeType::kBFloat16, 3e-2);
}

// Weights take the blocked path, which returns them exactly, even when flash_min_keys is met.
TEST(FlashAttentionTest, WeightsStillExact) {
  std::mt19937_64 rng(11);
  FlashCase c{MhaConfig{24, 3, 0, 0, true}, 2, 40, 40, 5, 7, true, true};
  const MhaWeights weights = testing::RandomTestWeights(c.config, rng);
  auto layer = MultiheadAttention::Create(FlashOptions(c), weights);
  ASSERT_TRUE(layer.ok()) << layer.status();
  const std::vector<float> query = RandomValues(rng, c.batch * c.q_len * c.config.embed_dim);
  std::vector<uint8_t> padding(c.batch * c.kv_len, 0);
  padding[3] = padding[50] = 1;
  AttentionInputs in;
  in.query = TensorView::F32(query.data(), {c.batch, c.q_len, c.config.embed_dim});
  in.is_causal = true;
  in.key_padding_mask = TensorView::Bool(padding.data(), {c.batch, c.kv_len});
  in.need_weights = true;
  auto got = (*layer)->Forward(in);
  ASSERT_TRUE(got.ok()) << got.status();
  const testing::NaiveOutputs want = testing::NaiveMultiheadAttention(c.config, weights, in);
  EXPECT_LE(MaxAbsDiff(got->output.values, want.output), 2e-5);
  EXPECT_LE(MaxAbsDiff(got->attn_weights.values, want.attn_weights), 1e-6);
}

// How many times a request asks whether to stop on a layer built with `options`: the flash path asks once
// per (sequence, head, query block), the blocked path here once for the whole request (its scores fit one
// block). So the count tells which path ran. -1 when the layer or the request fails.
int StopsAsked(const MultiheadAttention::Options& options, const MhaWeights& weights, const AttentionInputs& in) {
  auto layer = MultiheadAttention::Create(options, weights);
  if (!layer.ok()) return -1;
  auto parsed = (*layer)->Validate(in);
  if (!parsed.ok()) return -1;
  std::atomic<int> asked{0};
  const ParsedAttention* requests[] = {&*parsed};
  auto results = (*layer)->ForwardParsed(requests, 2, [&](size_t) {
    ++asked;
    return absl::OkStatus();
  });
  return results[0].ok() ? asked.load() : -1;
}

TEST(FlashAttentionTest, RequestsWithoutWeightsTakeTheFlashPath) {
  std::mt19937_64 rng(9);
  FlashCase c{MhaConfig{32, 2, 0, 0, true}, 3, 20, 20, 8, 16, true, true};
  const MhaWeights weights = testing::RandomTestWeights(c.config, rng);
  const std::vector<float> query = RandomValues(rng, c.batch * c.q_len * c.config.embed_dim);
  AttentionInputs in;
  in.query = TensorView::F32(query.data(), {c.batch, c.q_len, c.config.embed_dim});
  in.is_causal = true;
  constexpr int kFlashItems = 3 * 2 * 3;  // B x H x ceil(20 / 8) query blocks
  for (int64_t min_keys : {int64_t{20}, int64_t{21}, int64_t{0}}) {
    MultiheadAttention::Options options = FlashOptions(c);
    options.flash_min_keys = min_keys;
    EXPECT_EQ(StopsAsked(options, weights, in), min_keys == 20 ? kFlashItems : 1) << "flash_min_keys " << min_keys;
  }
  // A key padding mask keeps the flash path; asking for the weights does not.
  std::vector<uint8_t> padding(c.batch * c.kv_len, 0);
  padding[5] = 1;
  AttentionInputs masked = in;
  masked.key_padding_mask = TensorView::Bool(padding.data(), {c.batch, c.kv_len});
  EXPECT_EQ(StopsAsked(FlashOptions(c), weights, masked), kFlashItems);
  masked.need_weights = true;
  EXPECT_EQ(StopsAsked(FlashOptions(c), weights, masked), 1);
  // BFLOAT16 layers take it too; on brgemm kernels (the CPU's 256 x 256 blocks, Dh = 64) from one whole key block up,
  // under flash_min_keys: 300 keys, 2 heads x 2 query blocks.
  MultiheadAttention::Options options = FlashOptions(c);
  options.compute = ComputeType::kBFloat16;
  options.short_attention_max_len = 0;  // 20 tokens would take ShortAttention on brgemm kernels
  EXPECT_EQ(StopsAsked(options, weights, in), kFlashItems);
  options = MultiheadAttention::Options();
  options.config = MhaConfig{128, 2, 0, 0, true};
  options.compute = ComputeType::kBFloat16;
  options.small_attention_flops = 0;
  const MhaWeights bf16_weights = testing::RandomTestWeights(options.config, rng);
  auto layer = MultiheadAttention::Create(options, bf16_weights);
  ASSERT_TRUE(layer.ok()) << layer.status();
  EXPECT_EQ((*layer)->flash_blocks_on_brgemm(), OnednnHasBf16Brgemm());
  const std::vector<float> tokens = RandomValues(rng, 300 * 128);
  AttentionInputs longer;
  longer.query = TensorView::F32(tokens.data(), {1, 300, 128});
  EXPECT_EQ(StopsAsked(options, bf16_weights, longer), OnednnHasBf16Brgemm() ? 4 : 1);
}

// A stop asked for between blocks fails that request with the stop's status.
TEST(FlashAttentionTest, StopEndsTheRequest) {
  std::mt19937_64 rng(5);
  FlashCase c{MhaConfig{32, 2, 0, 0, true}, 1, 64, 64, 8, 16, true, false};
  const MhaWeights weights = testing::RandomTestWeights(c.config, rng);
  auto layer = MultiheadAttention::Create(FlashOptions(c), weights);
  ASSERT_TRUE(layer.ok()) << layer.status();
  const std::vector<float> query = RandomValues(rng, c.q_len * c.config.embed_dim);
  AttentionInputs in;
  in.query = TensorView::F32(query.data(), {1, c.q_len, c.config.embed_dim});
  auto parsed = (*layer)->Validate(in);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  std::atomic<int> asked{0};
  auto stop = [&](size_t) {
    return ++asked > 3 ? absl::DeadlineExceededError("deadline") : absl::OkStatus();
  };
  const ParsedAttention* requests[] = {&*parsed};
  auto results = (*layer)->ForwardParsed(requests, 2, stop);
  ASSERT_EQ(results.size(), 1u);
  EXPECT_EQ(results[0].status().code(), absl::StatusCode::kDeadlineExceeded);
}

// FlashAttention called directly on projections laid out as a self-attention layer's: B sequences of L rows of
// 3E floats (Q, K, V), the context [B, L, E].
struct DirectFlash {
  std::vector<float> qkv, out;
  FlashAttentionArgs args;

  // args points into qkv and out: moved, not copied.
  DirectFlash(const DirectFlash&) = delete;
  DirectFlash(DirectFlash&&) = default;

  DirectFlash(std::mt19937_64& rng, int64_t batch, int64_t heads, int64_t head_dim, int64_t len, bool causal) {
    const int64_t e = heads * head_dim;
    qkv = RandomValues(rng, batch * len * 3 * e);
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));  // in Q, as the layers put it
    for (int64_t row = 0; row < batch * len; ++row) {
      for (int64_t i = 0; i < e; ++i) qkv[row * 3 * e + i] *= scale;
    }
    out.assign(batch * len * e, 0.0f);
    args.batch = batch;
    args.heads = heads;
    args.q_len = args.kv_len = len;
    args.head_dim = head_dim;
    args.causal = causal;
    args.q = {qkv.data(), 3 * e, len * 3 * e};
    args.k = {qkv.data() + e, 3 * e, len * 3 * e};
    args.v = {qkv.data() + 2 * e, 3 * e, len * 3 * e};
    args.out = out.data();
    args.out_ld = e;
    args.out_seq_stride = len * e;
  }

  // A case whose block sizes cut strips, panels, pairs and the causal diagonal unevenly: head sizes 1-130 (64 in the
  // first 4 iterations), up to 300 tokens, 2 sequences and 3 heads.
  static DirectFlash Draw(std::mt19937_64& rng, int iter) {
    auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
    const int64_t head_dim = iter < 4 ? 64 : pick(1, 130), len = pick(1, 300);
    DirectFlash flash(rng, pick(1, 2), pick(1, 3), head_dim, len, pick(0, 1) == 1);
    flash.args.query_rows = pick(1, 80);
    flash.args.key_cols = pick(1, 200);
    return flash;
  }

  std::string Describe() const {
    return absl::StrCat("Dh ", args.head_dim, " L ", args.q_len, " causal ", args.causal, " blocks ", args.query_rows,
                        "x", args.key_cols);
  }

  // The context with args.strips = strips, from NaN everywhere (a row left unwritten fails the comparisons), on
  // `threads` threads; the calling thread's scratch starts empty and ends within FlashScratchBytes, the figure the
  // memory budget counts.
  std::vector<float> Run(bool strips, int threads = 1) {
    args.strips = strips;
    std::fill(out.begin(), out.end(), std::numeric_limits<float>::quiet_NaN());
    ReleaseFlashScratch(0);
    EXPECT_TRUE(FlashAttention(args, threads, [] { return absl::OkStatus(); }).ok());
    EXPECT_LE(FlashScratchHeldBytes(), FlashScratchBytes(args)) << "strips " << strips;
    return out;
  }
};

// The f32 blocks on the strip kernels and on sgemm give the same context (DirectFlash::Draw's cases), and what a
// thread holds afterwards is within FlashScratchBytes on either path.
TEST(FlashAttentionTest, StripKernelsMatchSgemmBlocksAndStayWithinTheirScratch) {
  std::mt19937_64 rng(20261206);
  for (int iter = 0; iter < 60; ++iter) {
    DirectFlash flash = DirectFlash::Draw(rng, iter);
    SCOPED_TRACE(::testing::Message() << "case " << iter << ": " << flash.Describe());
    const std::vector<float> sgemm = flash.Run(false), strips = flash.Run(true);
    EXPECT_TRUE(std::none_of(sgemm.begin(), sgemm.end(), [](float x) { return std::isnan(x); }));
    // Where the strips cannot run (head_dim > 128, or ATTNSERVE_MAX_KERNEL_ISA=AVX2) both runs took sgemm.
    EXPECT_LE(MaxAbsDiff(strips, sgemm), 2e-5);  // NaN fails it
  }
}

// key_bias is added after add_mask, so a mask that transforms scores cannot reopen a padded key, and key chunks
// padded whole are skipped (add_mask never sees them): an add_mask that sets every score to 0 leaves each row the
// mean of the values of the keys it sees unpadded. Key chunks of a multiple of 16 keys, so that both paths (sgemm
// blocks, strips) chunk keys alike; a run of padded keys covering whole chunks, and scattered padded keys.
TEST(FlashAttentionTest, KeyBiasComesAfterAddMaskAndSkipsChunksPaddedWhole) {
  std::mt19937_64 rng(20261209);
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  for (int iter = 0; iter < 30; ++iter) {
    const int64_t cols = 16 * pick(1, 4), len = pick(2, 6) * cols + pick(0, cols - 1), dh = pick(1, 40);
    DirectFlash flash(rng, pick(1, 2), pick(1, 3), dh, len, pick(0, 1) == 1);
    FlashAttentionArgs& a = flash.args;
    a.query_rows = pick(1, 40);
    a.key_cols = cols;
    // [m0, m1): one to three whole chunks after the first (key 0 open).
    const int64_t chunks = len / cols, m0 = cols * pick(1, chunks - 1),
                  m1 = std::min(chunks, m0 / cols + pick(1, 3)) * cols;
    std::vector<float> bias(a.batch * len, 0.0f);
    for (int64_t b = 0; b < a.batch; ++b) {
      for (int64_t j = 1; j < len; ++j) {
        if ((j >= m0 && j < m1) || pick(0, 5) == 0) bias[b * len + j] = -std::numeric_limits<float>::infinity();
      }
    }
    a.key_bias = bias.data();
    std::atomic<int> in_padded_run{0};
    a.add_mask = [&](int64_t, int64_t, int64_t, int64_t rows, int64_t k0, int64_t n, float* scores, int64_t ld) {
      if (k0 >= m0 && k0 + n <= m1) in_padded_run.fetch_add(1);
      for (int64_t r = 0; r < rows; ++r) std::fill_n(scores + r * ld, n, 0.0f);
    };
    SCOPED_TRACE(::testing::Message() << "case " << iter << ": " << flash.Describe() << " padded run [" << m0 << ", "
                                      << m1 << ")");
    // Row i of (b, h): the mean of V over the unpadded keys it sees.
    const int64_t e = a.heads * dh;
    std::vector<float> want(flash.out.size());
    for (int64_t b = 0; b < a.batch; ++b) {
      for (int64_t i = 0; i < len; ++i) {
        for (int64_t c = 0; c < e; ++c) {
          double sum = 0;
          int64_t open = 0;
          for (int64_t j = 0; j < (a.causal ? i + 1 : len); ++j) {
            if (std::isinf(bias[b * len + j])) continue;
            sum += flash.qkv[(b * len + j) * 3 * e + 2 * e + c];
            ++open;
          }
          want[(b * len + i) * e + c] = static_cast<float>(sum / static_cast<double>(open));
        }
      }
    }
    for (bool strips : {false, true}) {
      EXPECT_LE(MaxAbsDiff(flash.Run(strips), want), 1e-5) << "strips " << strips;  // NaN fails it
    }
    EXPECT_EQ(in_padded_run.load(), 0) << "add_mask saw keys of a chunk padded whole";
  }
}

// bf16 operands for `flash`: its Q, K and V rows rounded to bf16 (same layout), and the bf16 matmuls.
struct DirectBf16 {
  std::vector<uint16_t> qkv16;
  std::unique_ptr<HeadMatmulOp> scores_op, context_op;

  absl::Status Attach(DirectFlash& flash) {
    qkv16.resize(flash.qkv.size());
    std::transform(flash.qkv.begin(), flash.qkv.end(), qkv16.begin(), FloatToBFloat16);
    const int64_t dh = flash.args.head_dim, e = flash.args.heads * dh, len = flash.args.q_len;
    auto scores = HeadMatmulOp::Create(HeadMatmulOp::Kind::kScores, dh, ComputeType::kBFloat16);
    auto context = HeadMatmulOp::Create(HeadMatmulOp::Kind::kContextAdd, dh, ComputeType::kBFloat16);
    if (!scores.ok()) return scores.status();
    if (!context.ok()) return context.status();
    scores_op = *std::move(scores);
    context_op = *std::move(context);
    FlashBf16& w = flash.args.bf16;
    w.q = qkv16.data();
    w.k = qkv16.data() + e;
    w.v = qkv16.data() + 2 * e;
    w.ld = 3 * e;
    w.q_seq_stride = w.kv_seq_stride = len * 3 * e;
    w.scores_op = scores_op.get();
    w.context_add_op = context_op.get();
    return absl::OkStatus();
  }
};

// The bf16 strip kernels against the layer's bf16 matmuls (runtime sizes) and the f32 strips, on DirectFlash::Draw's
// cases (odd head sizes included), each within FlashScratchBytes.
TEST(FlashAttentionTest, Bf16StripKernelsMatchBf16MatmulsAndStayWithinTheirScratch) {
  if (OnednnBf16Support() == Bf16Support::kUnavailable) GTEST_SKIP() << "no bf16 matmul on this CPU";
  std::mt19937_64 rng(20261207);
  for (int iter = 0; iter < 40; ++iter) {
    DirectFlash flash = DirectFlash::Draw(rng, iter);
    SCOPED_TRACE(::testing::Message() << "case " << iter << ": " << flash.Describe());
    const std::vector<float> f32 = flash.Run(true);
    DirectBf16 bf16;
    ASSERT_TRUE(bf16.Attach(flash).ok());
    const std::vector<float> matmuls = flash.Run(false), strips = flash.Run(true);
    EXPECT_EQ(FlashOnStrips(flash.args), FlashBf16OnStrips(flash.args.head_dim));
    EXPECT_LE(MaxAbsDiff(matmuls, f32), 3e-2);  // NaN fails it
    EXPECT_LE(MaxAbsDiff(strips, f32), 3e-2);
    // Both round the same bf16 products; their probabilities are rounded at different running maxima, and the strips'
    // from exponentials within 3e-6 of exact (ExpNonPositiveForBf16Avx512).
    EXPECT_LE(MaxAbsDiff(strips, matmuls), 1e-2);
  }
}

// With 8 (sequence, head) pairs on 2 threads (ItemsPerChunk: whole heads) every query block still runs once (the
// context starts as NaN), and the context is the one thread's: bit for bit on the strip kernels, whose arithmetic
// does not depend on the thread; within rounding on the matmuls, which oneDNN may split otherwise outside a
// parallel region than inside one.
TEST(FlashAttentionTest, WholeHeadsPerThreadGiveTheOneThreadContext) {
  std::mt19937_64 rng(20261211);
  for (bool causal : {false, true}) {
    DirectFlash flash(rng, 2, 4, 64, 300, causal);
    flash.args.query_rows = 48;
    flash.args.key_cols = 100;
    DirectBf16 bf16;
    for (bool bf16_layer : {false, true}) {
      if (bf16_layer && OnednnBf16Support() == Bf16Support::kUnavailable) continue;
      if (bf16_layer) {
        ASSERT_TRUE(bf16.Attach(flash).ok());
      }
      for (bool strips : {false, true}) {
        const std::vector<float> one = flash.Run(strips, 1), two = flash.Run(strips, 2);
        const bool on_strips = FlashOnStrips(flash.args);
        EXPECT_LE(MaxAbsDiff(two, one), on_strips ? 0.0 : 1e-5)
            << "causal " << causal << " bf16 " << bf16_layer << " strips " << on_strips;
      }
    }
  }
}

// Grouped-query attention: `heads` query heads over kv_heads key and value heads, each read by heads / kv_heads
// query heads in turn.
struct GroupedCase {
  int64_t batch, heads, kv_heads, head_dim, len, query_rows, key_cols;
  bool causal;
};

// Rows [Q (heads) | K (kv_heads) | V (kv_heads)] of head_dim floats each, with K and V repeated per query head:
// [Q | K (heads) | V (heads)], what the same attention reads without groups.
std::vector<float> RepeatKvHeads(const std::vector<float>& rows, const GroupedCase& c) {
  const int64_t dh = c.head_dim, q = c.heads * dh, kv = c.kv_heads * dh, group = c.heads / c.kv_heads;
  const int64_t in_width = q + 2 * kv, out_width = 3 * q;
  std::vector<float> out(static_cast<size_t>(c.batch * c.len * out_width));
  for (int64_t t = 0; t < c.batch * c.len; ++t) {
    const float* src = rows.data() + t * in_width;
    float* dst = out.data() + t * out_width;
    std::copy_n(src, q, dst);
    for (int64_t h = 0; h < c.heads; ++h) {
      std::copy_n(src + q + h / group * dh, dh, dst + q + h * dh);
      std::copy_n(src + q + kv + h / group * dh, dh, dst + 2 * q + h * dh);
    }
  }
  return out;
}

// The bf16 matmuls of a head size, for a bf16 layer's FlashAttention, and its whole blocks' where oneDNN has brgemm
// kernels for them (else null).
struct Bf16HeadOps {
  std::unique_ptr<HeadMatmulOp> scores, context_add;
  FlashBlockMatmuls blocks;
};

// FlashAttention's context [B, L, heads * Dh] (from NaN everywhere) on rows [Q | K | V] holding kv_in_rows kv heads,
// args.kv_heads = kv_heads_arg; with `bf16` set, on the rows rounded to bf16 and its matmuls.
std::vector<float> RunGrouped(const GroupedCase& c, const std::vector<float>& rows, int64_t kv_in_rows,
                              int64_t kv_heads_arg, const Bf16HeadOps* bf16, bool strips, int threads) {
  const int64_t dh = c.head_dim, q = c.heads * dh, kv = kv_in_rows * dh, width = q + 2 * kv, stride = c.len * width;
  FlashAttentionArgs a;
  a.batch = c.batch;
  a.heads = c.heads;
  a.kv_heads = kv_heads_arg;
  a.q_len = a.kv_len = c.len;
  a.head_dim = dh;
  a.causal = c.causal;
  a.query_rows = c.query_rows;
  a.key_cols = c.key_cols;
  a.strips = strips;
  a.q = {rows.data(), width, stride};
  a.k = {rows.data() + q, width, stride};
  a.v = {rows.data() + q + kv, width, stride};
  std::vector<uint16_t> rows16(rows.size());
  if (bf16 != nullptr) {
    std::transform(rows.begin(), rows.end(), rows16.begin(), FloatToBFloat16);
    a.bf16.q = rows16.data();
    a.bf16.k = rows16.data() + q;
    a.bf16.v = rows16.data() + q + kv;
    a.bf16.ld = width;
    a.bf16.q_seq_stride = a.bf16.kv_seq_stride = stride;
    a.bf16.scores_op = bf16->scores.get();
    a.bf16.context_add_op = bf16->context_add.get();
    a.bf16.block_scores = bf16->blocks.scores.get();
    a.bf16.block_context = bf16->blocks.context.get();
  }
  std::vector<float> out(static_cast<size_t>(c.batch * c.len * q), std::numeric_limits<float>::quiet_NaN());
  a.out = out.data();
  a.out_ld = q;
  a.out_seq_stride = c.len * q;
  const absl::Status status = FlashAttention(a, threads, [] { return absl::OkStatus(); });
  EXPECT_TRUE(status.ok()) << status;
  return out;
}

// kv_heads groups: the context equals that of the same attention with each kv head repeated for its query heads
// (random group sizes 1-4, head sizes 1-130, blocks cutting rows and keys unevenly, causal and not; strips and
// sgemm, f32 and bf16 (whole blocks on brgemm kernels in half the bf16 cases, where oneDNN has them), 1 and 2
// threads, whose threads each pack a group's keys once for its heads): bit for bit on the strip kernels, whose
// arithmetic does not depend on where the rows are.
TEST(FlashAttentionTest, GroupedKvHeadsEqualEachRepeatedForItsGroup) {
  std::mt19937_64 rng(20261208);
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  const bool has_bf16 = OnednnBf16Support() != Bf16Support::kUnavailable;
  int on_brgemm_blocks = 0;
  for (int iter = 0; iter < 30; ++iter) {
    GroupedCase c;
    c.kv_heads = pick(1, 3);
    c.heads = c.kv_heads * std::vector<int64_t>{1, 2, 4}[pick(0, 2)];
    c.head_dim = iter < 4 ? 64 : pick(1, 130);
    c.batch = pick(1, 2);
    c.len = pick(1, 200);
    c.query_rows = pick(1, 80);
    c.key_cols = pick(1, 200);
    c.causal = pick(0, 1) == 1;
    Bf16HeadOps ops;
    const bool bf16 = has_bf16 && iter % 3 == 2;
    if (bf16) {
      ops.scores = *HeadMatmulOp::Create(HeadMatmulOp::Kind::kScores, c.head_dim, ComputeType::kBFloat16);
      ops.context_add = *HeadMatmulOp::Create(HeadMatmulOp::Kind::kContextAdd, c.head_dim, ComputeType::kBFloat16);
      if (iter % 2 == 0) {  // sizes brgemm takes, as a layer's 256 x 256 are
        c.query_rows = 32;
        c.key_cols = 64;
        ops.blocks = *CreateFlashBlockMatmuls(c.query_rows, c.key_cols, c.head_dim);
        on_brgemm_blocks += ops.blocks.scores != nullptr;
      }
    }
    SCOPED_TRACE(::testing::Message() << "case " << iter << ": H " << c.heads << " Hkv " << c.kv_heads << " Dh "
                                      << c.head_dim << " B " << c.batch << " L " << c.len << " causal " << c.causal
                                      << " blocks " << c.query_rows << "x" << c.key_cols << " bf16 " << bf16);
    const std::vector<float> rows = RandomValues(rng, c.batch * c.len * (c.heads + 2 * c.kv_heads) * c.head_dim);
    const std::vector<float> repeated = RepeatKvHeads(rows, c);
    for (bool strips : {false, true}) {
      const std::vector<float> want = RunGrouped(c, repeated, c.heads, 0, bf16 ? &ops : nullptr, strips, 1);
      for (int threads : {1, 2}) {
        const std::vector<float> got =
            RunGrouped(c, rows, c.kv_heads, c.kv_heads, bf16 ? &ops : nullptr, strips, threads);
        const bool exact = strips && (bf16 ? FlashBf16OnStrips(c.head_dim) : FlashStripsAvailable(c.head_dim));
        EXPECT_LE(MaxAbsDiff(got, want), exact ? 0.0 : 1e-5) << "strips " << strips << " threads " << threads;
      }
    }
  }
  if (OnednnHasBf16Brgemm()) {
    EXPECT_GT(on_brgemm_blocks, 0);
  }
}

TEST(FlashAttentionTest, WindowsOnlyWithCausalAndNeverNegative) {
  FlashAttentionArgs a;
  a.batch = a.q_len = a.kv_len = 1;
  a.heads = 4;
  a.head_dim = 8;
  for (const auto& [window, causal] : {std::pair<int64_t, bool>{8, false}, {-1, true}}) {
    a.window = window;
    a.causal = causal;
    const absl::Status status = FlashAttention(a, 1, [] { return absl::OkStatus(); });
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << window;
    EXPECT_THAT(std::string(status.message()), ::testing::HasSubstr("window")) << window;
  }
}

TEST(FlashAttentionTest, KvHeadsThatDoNotDivideTheHeadsAreRefused) {
  FlashAttentionArgs a;
  a.batch = a.q_len = a.kv_len = 1;
  a.heads = 4;
  a.head_dim = 8;
  for (int64_t kv_heads : {3, -1, 5}) {
    a.kv_heads = kv_heads;
    const absl::Status status = FlashAttention(a, 1, [] { return absl::OkStatus(); });
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << kv_heads;
    EXPECT_THAT(std::string(status.message()), ::testing::HasSubstr("kv_heads")) << kv_heads;
  }
}

// The online softmax over key blocks, then normalised, equals one softmax over the whole row (float64),
// for the causal diagonal's open prefixes too; the accumulated context is rescaled along.
TEST(FlashAttentionTest, OnlineSoftmaxBlocksEqualOneSoftmax) {
  std::mt19937_64 rng(3);
  const int64_t rows = 9, keys = 70, block = 16, dh = 5;
  const std::vector<float> scores = RandomValues(rng, rows * keys, 4.0f);
  const std::vector<float> values = RandomValues(rng, keys * dh);
  for (int64_t open0 : {keys, int64_t{30}}) {  // all keys open; row r sees the first 30 + r
    std::vector<float> row_max(rows, -std::numeric_limits<float>::infinity()), row_sum(rows, 0.0f);
    std::vector<float> acc(rows * dh, 0.0f), blk(rows * block);
    for (int64_t k0 = 0; k0 < keys; k0 += block) {
      const int64_t kb = std::min(block, keys - k0);
      for (int64_t r = 0; r < rows; ++r) std::copy_n(&scores[r * keys + k0], kb, &blk[r * kb]);
      OnlineSoftmaxBlock(blk.data(), rows, kb, kb, open0 - k0, row_max.data(), row_sum.data(), acc.data(), dh, dh);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < kb; ++j) {
          for (int64_t d = 0; d < dh; ++d) acc[r * dh + d] += blk[r * kb + j] * values[(k0 + j) * dh + d];
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t open = std::min(keys, open0 + r);
      double max = -1e300, sum = 0;
      for (int64_t j = 0; j < open; ++j) max = std::max(max, double{scores[r * keys + j]});
      std::vector<double> want(dh, 0.0);
      for (int64_t j = 0; j < open; ++j) {
        const double p = std::exp(double{scores[r * keys + j]} - max);
        sum += p;
        for (int64_t d = 0; d < dh; ++d) want[d] += p * values[j * dh + d];
      }
      for (int64_t d = 0; d < dh; ++d) {
        EXPECT_NEAR(acc[r * dh + d] / row_sum[r], want[d] / sum, 1e-5) << "open0 " << open0 << " row " << r;
      }
    }
  }
}

}  // namespace
}  // namespace attnserve
