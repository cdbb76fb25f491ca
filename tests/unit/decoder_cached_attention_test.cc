// DecoderAttention's session appends (core/decoder_cached_attention.cc): any split of a sequence into appends,
// over a paged cache with any block size, equals the whole sequence's causal Forward (outputs and weights),
// across sliding-window boundaries with the blocks that left the window freed; several sessions in one
// batch; the appends it refuses.
#include <random>

#include "core/decoder_attention.h"
#include "core/kv_cache_pool.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_decoder.h"

namespace attnserve {
namespace {

using testing::MaxAbsDiff;
using testing::RandomValues;

int64_t Pick(std::mt19937_64& rng, int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

DecoderConfig RandomConfig(std::mt19937_64& rng) {
  DecoderConfig c;
  c.num_kv_heads = Pick(rng, 1, 3);
  c.num_heads = c.num_kv_heads * std::vector<int64_t>{1, 2, 4}[Pick(rng, 0, 2)];
  c.head_dim = 2 * Pick(rng, 1, 8);
  c.embed_dim = Pick(rng, 0, 1) ? c.num_heads * c.head_dim : Pick(rng, 1, 40);
  c.qkv_bias = Pick(rng, 0, 1);
  c.o_bias = Pick(rng, 0, 1);
  c.rope.rotary_dim = Pick(rng, 0, 2) ? c.head_dim : 2 * Pick(rng, 1, c.head_dim / 2);
  c.rope.interleaved = Pick(rng, 0, 1);
  c.sliding_window = Pick(rng, 0, 1) ? Pick(rng, 1, 12) : 0;
  c.attn_logit_softcapping = Pick(rng, 0, 2) == 0 ? 0.5 + Pick(rng, 0, 30) : 0;
  return c;
}

// Seeded weights (biases as the config asks), from the rng's next draw.
DecoderWeights RandomWeights(const DecoderConfig& c, std::mt19937_64& rng) {
  return RandomDecoderWeights(c, rng());
}

std::unique_ptr<KvCachePool> Pool(int64_t block_tokens, int64_t bytes = int64_t{64} << 20) {
  auto pool = KvCachePool::Create({bytes, block_tokens});
  EXPECT_TRUE(pool.ok()) << pool.status();
  return std::move(*pool);
}

// One session of one layer: its whole sequence, the appends it was cut into, and its cache.
struct Session {
  std::vector<float> tokens;  // [L, E]
  std::vector<int64_t> cuts;  // append sizes, summing to L
  KvSequence cache;
  size_t next = 0;
  int64_t done = 0;
};

// Rows [from, from + t) of a [.., L, cols] or [L, cols] tensor's last two dims, every leading index.
std::vector<float> Rows(const Tensor& full, int64_t from, int64_t t, int64_t cols) {
  const int64_t len = full.shape[full.shape.size() - 2], full_cols = full.shape.back();
  const int64_t lead = static_cast<int64_t>(full.values.size()) / (len * full_cols);
  std::vector<float> out;
  for (int64_t h = 0; h < lead; ++h) {
    for (int64_t i = from; i < from + t; ++i) {
      const float* row = full.values.data() + (h * len + i) * full_cols;
      out.insert(out.end(), row, row + cols);
    }
  }
  return out;
}

TEST(DecoderCachedAttentionTest, AnySplitOfAppendsEqualsTheFullCausalForward) {
  std::mt19937_64 rng(20261203);
  for (int trial = 0; trial < 120; ++trial) {
    DecoderAttention::Options options;
    options.config = RandomConfig(rng);
    options.scores_block_bytes = Pick(rng, 0, 1) ? 4 * Pick(rng, 1, 200) : int64_t{2} << 20;
    options.min_block_rows = Pick(rng, 1, 8);
    options.cache_span_bytes = Pick(rng, 0, 1) ? 4 * Pick(rng, 1, 300) : int64_t{1} << 20;
    options.single_thread_below_flops = Pick(rng, 0, 1) ? 0 : int64_t{64} << 20;
    const DecoderConfig& c = options.config;
    auto layer = DecoderAttention::Create(options, RandomWeights(c, rng));
    ASSERT_TRUE(layer.ok()) << layer.status();
    auto pool = Pool(Pick(rng, 1, 6));
    const bool need_weights = Pick(rng, 0, 1), averaged = Pick(rng, 0, 1);
    // Two sessions batched together, each cut at random; the window's old blocks freed as the server does.
    std::vector<Session> sessions;
    std::vector<AttentionOutputs> full;
    for (int s = 0; s < 2; ++s) {
      const int64_t len = Pick(rng, 1, 40);
      Session session{RandomValues(rng, len * c.embed_dim), {}, KvSequence(pool.get(), c.kv_width())};
      for (int64_t left = len; left > 0;) left -= session.cuts.emplace_back(Pick(rng, 1, std::min<int64_t>(left, 9)));
      DecoderInputs in;
      in.query = TensorView::F32(session.tokens.data(), {len, c.embed_dim});
      in.need_weights = true;
      in.average_attn_weights = averaged;
      auto out = (*layer)->Forward(in);
      ASSERT_TRUE(out.ok()) << out.status();
      full.push_back(std::move(*out));
      sessions.push_back(std::move(session));
    }
    SCOPED_TRACE(::testing::Message() << "trial " << trial << ": " << c.DebugString());
    for (bool more = true; more;) {
      more = false;
      std::vector<CachedAppend> appends;
      std::vector<int> owner;
      for (int s = 0; s < 2; ++s) {
        Session& ss = sessions[s];
        if (ss.next == ss.cuts.size()) continue;
        CachedAppend a;
        a.tokens = ss.cuts[ss.next];
        a.query = ss.tokens.data() + ss.done * c.embed_dim;
        a.cache = &ss.cache;
        a.need_weights = need_weights;
        a.average_attn_weights = averaged;
        ASSERT_TRUE(ss.cache.Reserve(a.tokens).ok());
        appends.push_back(a);
        owner.push_back(s);
      }
      std::vector<const CachedAppend*> ptrs;
      for (const CachedAppend& a : appends) ptrs.push_back(&a);
      auto got = (*layer)->ForwardAppends(ptrs, static_cast<int>(Pick(rng, 1, 2)));
      for (size_t m = 0; m < got.size(); ++m) {
        Session& ss = sessions[owner[m]];
        ASSERT_TRUE(got[m].ok()) << got[m].status();
        const int64_t t = appends[m].tokens, context = ss.done + t;
        const Tensor& want = full[owner[m]].output;
        EXPECT_LT(MaxAbsDiff(got[m]->output.values, Rows(want, ss.done, t, c.embed_dim)), 1e-4)
            << "session " << owner[m] << " rows " << ss.done << ".." << context;
        if (need_weights) {
          EXPECT_LT(MaxAbsDiff(got[m]->attn_weights.values, Rows(full[owner[m]].attn_weights, ss.done, t, context)),
                    1e-5);
        }
        ss.done = context;
        ++ss.next;
        if (c.sliding_window > 0) ss.cache.DropBefore(ss.cache.tokens() - c.sliding_window + 1);
        more = more || ss.next < ss.cuts.size();
      }
    }
  }
}

DecoderConfig WindowConfig() {
  DecoderConfig c;
  c.embed_dim = 32;
  c.num_heads = 8;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.rope.rotary_dim = 8;
  c.sliding_window = 6;
  return c;
}

TEST(DecoderCachedAttentionTest, SlidingWindowSessionsHoldOnlyTheWindowAndKvHeads) {
  std::mt19937_64 rng(7);
  DecoderAttention::Options options;
  options.config = WindowConfig();
  const DecoderConfig& c = options.config;
  auto layer = DecoderAttention::Create(options, RandomWeights(c, rng));
  ASSERT_TRUE(layer.ok());
  constexpr int64_t kBlock = 2, kLen = 50;
  auto pool = Pool(kBlock);
  const std::vector<float> x = RandomValues(rng, kLen * c.embed_dim);
  DecoderInputs in;
  in.query = TensorView::F32(x.data(), {kLen, c.embed_dim});
  auto full = (*layer)->Forward(in);
  ASSERT_TRUE(full.ok());
  KvSequence cache(pool.get(), c.kv_width());
  EXPECT_EQ(cache.width(), 16);  // Hkv * D: a quarter of the H * D an MHA cache of these heads would hold
  for (int64_t i = 0; i < kLen; ++i) {
    CachedAppend a;
    a.query = x.data() + i * c.embed_dim;
    a.tokens = 1;
    a.cache = &cache;
    const CachedAppend* one[] = {&a};
    auto got = (*layer)->ForwardAppends(one);
    ASSERT_TRUE(got[0].ok()) << got[0].status();
    ASSERT_LT(MaxAbsDiff(got[0]->output.values, Rows(full->output, i, 1, c.embed_dim)), 1e-4) << "token " << i;
    cache.DropBefore(cache.tokens() - c.sliding_window + 1);
    // The window's 6 keys span at most 4 blocks of 2 (plus the one filling): never the whole history.
    EXPECT_LE(cache.bytes(), 4 * pool->BlockBytes(c.kv_width())) << "token " << i;
  }
  EXPECT_EQ(cache.tokens(), kLen);
  EXPECT_EQ(cache.first_token(), 44);
  EXPECT_EQ(pool->used_bytes(), cache.bytes());
}

TEST(DecoderCachedAttentionTest, RefusesAppendsItCannotServe) {
  std::mt19937_64 rng(8);
  DecoderAttention::Options options;
  options.config = WindowConfig();
  const DecoderConfig& c = options.config;
  auto layer = DecoderAttention::Create(options, RandomWeights(c, rng));
  ASSERT_TRUE(layer.ok());
  auto pool = Pool(2);
  const std::vector<float> x = RandomValues(rng, 20 * c.embed_dim);
  auto run = [&](CachedAppend a) {
    const CachedAppend* one[] = {&a};
    return (*layer)->ForwardAppends(one)[0].status();
  };
  KvSequence wrong_width(pool.get(), c.embed_dim);
  CachedAppend a{x.data(), 3, &wrong_width};
  EXPECT_EQ(run(a).message(), "cache: expected width 16 (num_kv_heads * head_dim), got 32");
  KvSequence cache(pool.get(), c.kv_width());
  a = CachedAppend{x.data(), 3, &cache, /*cross_attention=*/true};
  EXPECT_EQ(run(a).message(), "memory: decoder layers have no cross-attention sessions");
  a = CachedAppend{x.data(), 0, &cache};
  EXPECT_EQ(run(a).message(), "query: expected T >= 1 tokens, got 0");
  // Keys freed by the window, then a truncate below them: the append says which keys it lacks.
  a = CachedAppend{x.data(), 20, &cache};
  ASSERT_TRUE(run(a).ok());
  cache.DropBefore(cache.tokens() - c.sliding_window + 1);
  EXPECT_EQ(cache.first_token(), 14);
  cache.Truncate(16);
  a = CachedAppend{x.data(), 1, &cache};
  EXPECT_EQ(run(a).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(run(a).message(), "cache: the keys from token 14 on are held, the append needs them from token 11");
}

}  // namespace
}  // namespace attnserve
