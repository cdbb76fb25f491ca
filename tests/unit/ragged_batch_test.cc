// A ragged batch (requests of different lengths, masks and kinds run together without padding) gives each
// request what it gets alone, and a bad request in the batch gets its own error without disturbing the rest.
#include <omp.h>

#include <algorithm>
#include <random>

#include "core/flash_strips_avx512.h"
#include "core/multihead_attention.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

using testing::RandomValues;

struct OwnedRequest {
  std::vector<float> query, key, value, attn_mask;
  std::vector<uint8_t> kpm;
  AttentionInputs inputs;
};

std::unique_ptr<OwnedRequest> RandomRequest(std::mt19937_64& rng, const MhaConfig& c, bool self) {
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  auto r = std::make_unique<OwnedRequest>();
  const int64_t b = pick(1, 3), l = pick(1, 40), s = self ? l : pick(1, 40), e = c.embed_dim;
  r->query = RandomValues(rng, b * l * e);
  r->inputs.query = TensorView::F32(r->query.data(), {b, l, e});
  if (!self) {
    r->key = RandomValues(rng, b * s * e);
    r->value = RandomValues(rng, b * s * e);
    r->inputs.key = TensorView::F32(r->key.data(), {b, s, e});
    r->inputs.value = TensorView::F32(r->value.data(), {b, s, e});
  }
  if (pick(0, 1)) {
    for (int64_t i = 0; i < b * s; ++i) r->kpm.push_back(pick(0, 4) == 0);
    r->inputs.key_padding_mask = TensorView::Bool(r->kpm.data(), {b, s});
  }
  if (pick(0, 1)) {
    r->attn_mask = RandomValues(rng, l * s);
    r->inputs.attn_mask = TensorView::F32(r->attn_mask.data(), {l, s});
  }
  r->inputs.is_causal = pick(0, 3) == 0;
  r->inputs.need_weights = pick(0, 1);
  r->inputs.average_attn_weights = pick(0, 1);
  return r;
}

TEST(RaggedBatchTest, BatchEqualsEachRequestAlone) {
  std::mt19937_64 rng(42);
  MhaConfig config{64, 4, 0, 0, true};
  const MhaWeights weights = testing::RandomTestWeights(config, rng);
  for (int64_t block_bytes : {int64_t{2} << 20, int64_t{4096}}) {
    MultiheadAttention::Options options;
    options.config = config;
    options.scores_block_bytes = block_bytes;
    options.min_block_rows = 1;
    options.single_thread_below_flops = block_bytes == 4096 ? 0 : options.single_thread_below_flops;
    auto layer = MultiheadAttention::Create(options, weights);
    ASSERT_TRUE(layer.ok()) << layer.status();
    for (int round = 0; round < 10; ++round) {
      std::vector<std::unique_ptr<OwnedRequest>> owned;
      std::vector<const AttentionInputs*> batch;
      const int n = 2 + round;
      for (int i = 0; i < n; ++i) {
        owned.push_back(RandomRequest(rng, config, /*self=*/i % 3 != 2));
        batch.push_back(&owned.back()->inputs);
      }
      auto together = (*layer)->ForwardBatch(batch);
      ASSERT_EQ(together.size(), batch.size());
      for (int i = 0; i < n; ++i) {
        auto alone = (*layer)->Forward(*batch[i]);
        ASSERT_TRUE(alone.ok()) << alone.status();
        ASSERT_TRUE(together[i].ok()) << together[i].status();
        EXPECT_EQ(together[i]->output.shape, alone->output.shape);
        EXPECT_LE(testing::MaxAbsDiff(together[i]->output.values, alone->output.values), 1e-6)
            << "request " << i << " of " << n;
        EXPECT_LE(testing::MaxAbsDiff(together[i]->attn_weights.values, alone->attn_weights.values), 1e-6);
        // and both agree with the float64 reference
        const auto want = testing::NaiveMultiheadAttention(config, weights, *batch[i]);
        EXPECT_LE(testing::MaxAbsDiff(together[i]->output.values, want.output), 2e-5);
      }
    }
  }
}

TEST(RaggedBatchTest, BadRequestGetsItsOwnErrorOthersUnaffected) {
  std::mt19937_64 rng(43);
  MhaConfig config{32, 4, 0, 0, true};
  const MhaWeights weights = testing::RandomTestWeights(config, rng);
  MultiheadAttention::Options options;
  options.config = config;
  auto layer = MultiheadAttention::Create(options, weights);
  ASSERT_TRUE(layer.ok());
  auto good1 = RandomRequest(rng, config, true);
  auto good2 = RandomRequest(rng, config, false);
  std::vector<float> bad_query = RandomValues(rng, 2 * 5 * 31);
  AttentionInputs bad;
  bad.query = TensorView::F32(bad_query.data(), {2, 5, 31});
  std::vector<const AttentionInputs*> batch = {&good1->inputs, &bad, &good2->inputs};
  auto results = (*layer)->ForwardBatch(batch);
  ASSERT_EQ(results.size(), 3u);
  EXPECT_EQ(results[1].status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(results[1].status().message().find("query"), std::string::npos) << results[1].status();
  for (int i : {0, 2}) {
    ASSERT_TRUE(results[i].ok()) << results[i].status();
    auto alone = (*layer)->Forward(*batch[i]);
    EXPECT_LE(testing::MaxAbsDiff(results[i]->output.values, alone->output.values), 1e-6);
  }
}

TEST(RaggedBatchTest, UnalignedInputDataIsHandled) {
  std::mt19937_64 rng(44);
  MhaConfig config{16, 2, 0, 0, true};
  const MhaWeights weights = testing::RandomTestWeights(config, rng);
  MultiheadAttention::Options options;
  options.config = config;
  auto layer = MultiheadAttention::Create(options, weights);
  ASSERT_TRUE(layer.ok());
  const std::vector<float> query = RandomValues(rng, 3 * 16);
  // Bytes as they might sit inside a protobuf message: at an odd address.
  std::vector<char> raw(query.size() * 4 + 1);
  std::memcpy(raw.data() + 1, query.data(), query.size() * 4);
  AttentionInputs aligned, unaligned;
  aligned.query = TensorView::F32(query.data(), {3, 16});
  unaligned.query = {DType::kFloat32, {3, 16}, raw.data() + 1};
  auto a = (*layer)->Forward(aligned);
  auto u = (*layer)->Forward(unaligned);
  ASSERT_TRUE(a.ok() && u.ok());
  EXPECT_EQ(a->output.values, u->output.values);
}

// What the server's memory budget counts for a request's scores: the block the engine plans, not the cap.
TEST(RaggedBatchTest, ScoresBlockBytesIsTheBlockPlanned) {
  std::mt19937_64 rng(7);
  MhaConfig config{64, 4, 0, 0, true};
  const MhaWeights weights = testing::RandomTestWeights(config, rng);
  MultiheadAttention::Options options;
  options.config = config;
  auto layer = MultiheadAttention::Create(options, weights);
  ASSERT_TRUE(layer.ok()) << layer.status();
  auto block_bytes = [&](const MultiheadAttention& m, int64_t b, int64_t l, bool padded = false) {
    std::vector<float> q = RandomValues(rng, b * l * 64);
    std::vector<uint8_t> padding(static_cast<size_t>(b * l), 0);
    padding.back() = 1;
    AttentionInputs in;
    in.query = TensorView::F32(q.data(), {b, l, 64});
    if (padded) in.key_padding_mask = TensorView::Bool(padding.data(), {b, l});
    auto parsed = m.Validate(in);
    EXPECT_TRUE(parsed.ok()) << parsed.status();
    return m.ScoresBlockBytes(*parsed);
  };
  EXPECT_EQ(block_bytes(**layer, 1, 8), 4 * 8 * 8 * 4);            // a short request: its whole scores
  EXPECT_EQ(block_bytes(**layer, 3, 8), 3 * 4 * 8 * 8 * 4);        // several sequences in one block
  // A long one on the flash path, per thread: its rows' context (Dh = 16) and 2 floats a row, and one head's keys
  // and values; with the strip kernels a strip's scores (6 rows of the CPU's key block), the keys packed, each
  // buffer with 15 floats to align it; on sgemm a whole scores block (the CPU's size), the context aligned.
  const auto [rows, keys] = FlashBlockForCpu();
  const int64_t per_thread_floats = FlashStripsAvailable(16)
                                        ? 6 * keys + rows * (16 + 2) + 2 * 4096 * 16 + 4 * 15
                                        : rows * (keys + 16 + 2) + 15 + 2 * 4096 * 16;
  const int64_t flash_bytes = 4 * per_thread_floats * omp_get_max_threads();
  EXPECT_EQ(block_bytes(**layer, 1, 4096), flash_bytes);
  // With a key_padding_mask, also the mask as a [B, S] float bias.
  EXPECT_EQ(block_bytes(**layer, 2, 4096, true), flash_bytes + 2 * 4096 * 4);
  options.flash_min_keys = 0;  // the blocked path from here on
  auto blocked = MultiheadAttention::Create(options, weights);
  ASSERT_TRUE(blocked.ok()) << blocked.status();
  EXPECT_EQ(block_bytes(**blocked, 1, 4096), int64_t{4} << 20);    // a long one: the cap, 64 rows of all heads
  options.scores_block_bytes = 4096;                               // a cap below min_block_rows of one head
  auto tiny = MultiheadAttention::Create(options, weights);
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  EXPECT_EQ(block_bytes(**tiny, 1, 4096), 64 * 4096 * 4);          // 64 rows of one head, past the cap
  // 8 short sequences, 4 to a block: a small request, its units side by side, a block per thread.
  EXPECT_EQ(block_bytes(**tiny, 8, 8), std::min<int64_t>(8 * 4 * 8 * 8 * 4, 4096 * omp_get_max_threads()));
}

}  // namespace
}  // namespace attnserve
