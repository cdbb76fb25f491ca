// Sessions' incremental attention (MultiheadAttention::ForwardAppends over a paged KV cache): for any split
// of a sequence into appends, the outputs equal causal attention over the whole sequence: PyTorch's (the
// golden `causal` case), the float64 reference, and the engine's own stateless causal Forward (1e-6). Forks
// and truncations too.
#include <random>

#include "core/kv_cache_pool.h"
#include "core/mha_weights.h"
#include "core/multihead_attention.h"
#include "core/safetensors.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

using testing::MaxAbsDiff;
using testing::RandomValues;

std::unique_ptr<KvCachePool> MakePool(int64_t block_tokens) {
  auto pool = KvCachePool::Create({.kv_cache_bytes = int64_t{256} << 20, .block_tokens = block_tokens});
  EXPECT_TRUE(pool.ok()) << pool.status();
  return std::move(*pool);
}

std::unique_ptr<MultiheadAttention> MakeLayer(const MhaConfig& config, const MhaWeights& weights,
                                              int64_t scores_block_bytes = int64_t{4} << 20,
                                              int64_t cache_span_bytes = int64_t{1} << 20) {
  MultiheadAttention::Options options;
  options.config = config;
  options.scores_block_bytes = scores_block_bytes;
  options.cache_span_bytes = cache_span_bytes;
  options.min_block_rows = 1;
  auto layer = MultiheadAttention::Create(options, weights);
  EXPECT_TRUE(layer.ok()) << layer.status();
  return std::move(*layer);
}

// Appends rows [begin, end) of x [n, E] to `cache`; returns the outputs [end - begin, E].
std::vector<float> AppendRows(const MultiheadAttention& layer, const std::vector<float>& x, int64_t begin, int64_t end,
                              KvSequence* cache, Tensor* weights = nullptr, bool average = true) {
  const int64_t e = layer.config().embed_dim;
  CachedAppend a;
  a.query = x.data() + begin * e;
  a.tokens = end - begin;
  a.cache = cache;
  a.need_weights = weights != nullptr;
  a.average_attn_weights = average;
  const CachedAppend* one[] = {&a};
  auto got = layer.ForwardAppends(one);
  EXPECT_TRUE(got[0].ok()) << got[0].status();
  if (!got[0].ok()) return {};
  if (weights != nullptr) *weights = std::move(got[0]->attn_weights);
  return got[0]->output.values;
}

// Cuts [0, n) into random chunks: single tokens, short runs and long ones.
std::vector<int64_t> RandomSplit(std::mt19937_64& rng, int64_t n) {
  std::vector<int64_t> cuts = {0};
  while (cuts.back() < n) {
    const int64_t kind = std::uniform_int_distribution<int64_t>(0, 2)(rng);
    const int64_t len =
        kind == 0 ? 1 : std::uniform_int_distribution<int64_t>(kind == 1 ? 2 : 5, kind == 1 ? 5 : 40)(rng);
    cuts.push_back(std::min(n, cuts.back() + len));
  }
  return cuts;
}

std::vector<float> StatelessCausal(const MultiheadAttention& layer, const std::vector<float>& x, int64_t n) {
  AttentionInputs in;
  in.query = TensorView::F32(x.data(), {n, layer.config().embed_dim});
  in.is_causal = true;
  auto out = layer.Forward(in);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? out->output.values : std::vector<float>{};
}

TEST(CachedAttentionTest, AnySplitEqualsCausalAttentionOverTheWholeSequence) {
  std::mt19937_64 rng(20261202);
  for (int iter = 0; iter < 24; ++iter) {
    MhaConfig config;
    config.num_heads = std::uniform_int_distribution<int64_t>(1, 4)(rng);
    // Head dims past two vectors of 16 lanes, with and without a tail, reach each path of the decode kernels.
    config.embed_dim = config.num_heads * std::uniform_int_distribution<int64_t>(2, 80)(rng);
    config.bias = iter % 3 != 0;
    const MhaWeights weights = testing::RandomTestWeights(config, rng);
    const int64_t n = std::uniform_int_distribution<int64_t>(1, 120)(rng);
    const int64_t block_tokens = std::uniform_int_distribution<int64_t>(1, 20)(rng);
    // Small score blocks in some cases force query blocking inside a long append; small spans in others make
    // a chunk's matmuls cross many spans of blocks (1 byte: one block per span).
    const int64_t span_bytes[] = {int64_t{1} << 20, 1, 3 * block_tokens * config.embed_dim * 4 + 5};
    const auto layer = MakeLayer(config, weights, iter % 4 == 0 ? 256 : int64_t{4} << 20, span_bytes[iter % 3]);
    const std::vector<float> x = RandomValues(rng, n * config.embed_dim);
    const std::vector<int64_t> cuts = RandomSplit(rng, n);
    SCOPED_TRACE(::testing::Message() << "case " << iter << ": " << config.DebugString() << " n=" << n
                                      << " block_tokens=" << block_tokens << " appends=" << cuts.size() - 1
                                      << " span_bytes=" << span_bytes[iter % 3]);
    auto pool = MakePool(block_tokens);
    KvSequence cache(pool.get(), config.embed_dim);
    std::vector<float> got;
    for (size_t c = 1; c < cuts.size(); ++c) {
      const std::vector<float> out = AppendRows(*layer, x, cuts[c - 1], cuts[c], &cache);
      got.insert(got.end(), out.begin(), out.end());
    }
    EXPECT_EQ(cache.tokens(), n);
    EXPECT_LE(MaxAbsDiff(got, StatelessCausal(*layer, x, n)), 1e-6);
    AttentionInputs in;
    in.query = TensorView::F32(x.data(), {n, config.embed_dim});
    in.is_causal = true;
    EXPECT_LE(MaxAbsDiff(got, testing::NaiveMultiheadAttention(config, weights, in).output), 1e-4);
  }
}

TEST(CachedAttentionTest, MatchesPyTorchGoldenCausalCase) {
  // tests/golden/causal: B=2, L=9, E=32, H=4, nn.MultiheadAttention(x, x, x, is_causal with the mask).
  MhaConfig config;
  config.embed_dim = 32;
  config.num_heads = 4;
  auto weights = LoadMhaWeights("tests/golden/causal.weights.safetensors", "", config);
  ASSERT_TRUE(weights.ok()) << weights.status();
  auto io = SafetensorsFile::Open("tests/golden/causal.io.safetensors");
  ASSERT_TRUE(io.ok()) << io.status();
  const std::vector<float> query = *(*io)->ReadFloat32("query");
  const std::vector<float> expected = *(*io)->ReadFloat32("output");
  const std::vector<float> expected_weights = *(*io)->ReadFloat32("attn_weights");  // [B, L, S] averaged
  const auto layer = MakeLayer(config, *weights);
  auto pool = MakePool(4);
  const int64_t l = 9, e = 32;
  for (const std::vector<int64_t>& cuts :
       std::vector<std::vector<int64_t>>{{0, 9}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, {0, 5, 6, 7, 8, 9}, {0, 2, 7, 9}}) {
    for (int64_t b = 0; b < 2; ++b) {
      const std::vector<float> x(query.begin() + b * l * e, query.begin() + (b + 1) * l * e);
      KvSequence cache(pool.get(), e);
      for (size_t c = 1; c < cuts.size(); ++c) {
        Tensor w;
        const std::vector<float> out = AppendRows(*layer, x, cuts[c - 1], cuts[c], &cache, &w);
        const std::vector<float> want(expected.begin() + (b * l + cuts[c - 1]) * e,
                                      expected.begin() + (b * l + cuts[c]) * e);
        EXPECT_LE(MaxAbsDiff(out, want), 1e-4) << "sequence " << b << " append " << c;
        // Weights over every cached key: row i of the append is row cuts[c-1]+i of PyTorch's, its first
        // cuts[c] columns.
        ASSERT_EQ(w.shape, (Shape{cuts[c] - cuts[c - 1], cuts[c]}));
        for (int64_t i = 0; i < cuts[c] - cuts[c - 1]; ++i) {
          for (int64_t j = 0; j < cuts[c]; ++j) {
            EXPECT_NEAR(w.values[i * cuts[c] + j], expected_weights[(b * l + cuts[c - 1] + i) * l + j], 1e-5);
          }
        }
      }
    }
  }
}

TEST(CachedAttentionTest, ForkedSessionsDivergeAndEachMatchesItsOwnSequence) {
  std::mt19937_64 rng(7);
  MhaConfig config;
  config.embed_dim = 48;
  config.num_heads = 3;
  const MhaWeights weights = testing::RandomTestWeights(config, rng);
  const auto layer = MakeLayer(config, weights);
  auto pool = MakePool(8);
  const int64_t e = config.embed_dim, prefix = 21, more = 13;
  std::vector<float> a = RandomValues(rng, (prefix + more) * e);
  std::vector<float> b = a;
  const std::vector<float> b_tail = RandomValues(rng, more * e);
  std::copy(b_tail.begin(), b_tail.end(), b.begin() + prefix * e);
  KvSequence cache_a(pool.get(), e);
  AppendRows(*layer, a, 0, prefix, &cache_a);
  KvSequence cache_b = cache_a.Fork();
  EXPECT_EQ(cache_b.shared_blocks(), 3);
  std::vector<float> got_a, got_b;
  for (int64_t t = prefix; t < prefix + more; ++t) {  // interleaved decode steps
    const std::vector<float> oa = AppendRows(*layer, a, t, t + 1, &cache_a);
    const std::vector<float> ob = AppendRows(*layer, b, t, t + 1, &cache_b);
    got_a.insert(got_a.end(), oa.begin(), oa.end());
    got_b.insert(got_b.end(), ob.begin(), ob.end());
  }
  const std::vector<float> full_a = StatelessCausal(*layer, a, prefix + more);
  const std::vector<float> full_b = StatelessCausal(*layer, b, prefix + more);
  EXPECT_LE(MaxAbsDiff(got_a, std::vector<float>(full_a.begin() + prefix * e, full_a.end())), 1e-6);
  EXPECT_LE(MaxAbsDiff(got_b, std::vector<float>(full_b.begin() + prefix * e, full_b.end())), 1e-6);
  EXPECT_EQ(cache_a.shared_blocks(), 2);  // the two full prefix blocks stay shared
}

TEST(CachedAttentionTest, TruncateThenReappendMatches) {
  std::mt19937_64 rng(11);
  MhaConfig config;
  config.embed_dim = 32;
  config.num_heads = 2;
  const MhaWeights weights = testing::RandomTestWeights(config, rng);
  const auto layer = MakeLayer(config, weights);
  auto pool = MakePool(5);
  const int64_t e = 32;
  const std::vector<float> draft = RandomValues(rng, 30 * e);
  std::vector<float> accepted = draft;
  const std::vector<float> fix = RandomValues(rng, 12 * e);
  std::copy(fix.begin(), fix.end(), accepted.begin() + 18 * e);
  KvSequence cache(pool.get(), e);
  AppendRows(*layer, draft, 0, 30, &cache);  // a speculative draft of 12 tokens past 18
  cache.Truncate(18);
  const std::vector<float> got = AppendRows(*layer, accepted, 18, 30, &cache);
  const std::vector<float> full = StatelessCausal(*layer, accepted, 30);
  EXPECT_LE(MaxAbsDiff(got, std::vector<float>(full.begin() + 18 * e, full.end())), 1e-6);
}

TEST(CachedAttentionTest, ABatchOfAppendsEqualsEachAlone) {
  std::mt19937_64 rng(3);
  MhaConfig config;
  config.embed_dim = 64;
  config.num_heads = 4;
  const MhaWeights weights = testing::RandomTestWeights(config, rng);
  const auto layer = MakeLayer(config, weights);
  auto pool = MakePool(16);
  const int64_t e = 64;
  std::vector<std::vector<float>> xs;
  std::vector<KvSequence> caches;
  const int64_t lens[] = {1, 40, 3, 70, 1, 9};
  for (int64_t len : lens) {
    xs.push_back(RandomValues(rng, (len + 50) * e));
    caches.emplace_back(pool.get(), e);
    AppendRows(*layer, xs.back(), 0, 50, &caches.back());  // a prefix
  }
  std::vector<CachedAppend> appends(xs.size());
  std::vector<const CachedAppend*> ptrs;
  for (size_t i = 0; i < xs.size(); ++i) {
    appends[i].query = xs[i].data() + 50 * e;
    appends[i].tokens = lens[i];
    appends[i].cache = &caches[i];
    appends[i].need_weights = i % 2 == 0;
    appends[i].average_attn_weights = i % 4 == 0;
    ptrs.push_back(&appends[i]);
  }
  const auto got = layer->ForwardAppends(ptrs, 2);
  for (size_t i = 0; i < xs.size(); ++i) {
    ASSERT_TRUE(got[i].ok()) << got[i].status();
    const std::vector<float> full = StatelessCausal(*layer, xs[i], 50 + lens[i]);
    EXPECT_LE(MaxAbsDiff(got[i]->output.values, std::vector<float>(full.begin() + 50 * e, full.end())), 1e-6) << i;
    if (appends[i].need_weights) {
      const int64_t s = 50 + lens[i];
      EXPECT_EQ(got[i]->attn_weights.shape,
                appends[i].average_attn_weights ? Shape({lens[i], s}) : Shape({4, lens[i], s}));
    }
  }
}

TEST(CachedAttentionTest, CrossAttentionOverProjectedMemory) {
  std::mt19937_64 rng(5);
  MhaConfig config;
  config.embed_dim = 32;
  config.num_heads = 4;
  config.kdim = config.vdim = 24;
  const MhaWeights weights = testing::RandomTestWeights(config, rng);
  const auto layer = MakeLayer(config, weights);
  auto pool = MakePool(16);
  const int64_t s = 37, t = 6;
  const std::vector<float> memory = RandomValues(rng, s * 24);
  const std::vector<float> x = RandomValues(rng, t * 32);
  KvSequence cache(pool.get(), 32);
  ASSERT_TRUE(layer->ProjectMemory(memory.data(), s, &cache).ok());
  CachedAppend a{.query = x.data(), .tokens = t, .cache = &cache, .cross_attention = true};
  const CachedAppend* one[] = {&a};
  auto got = layer->ForwardAppends(one);
  ASSERT_TRUE(got[0].ok()) << got[0].status();
  EXPECT_EQ(cache.tokens(), s);  // nothing appended
  AttentionInputs in;
  in.query = TensorView::F32(x.data(), {t, 32});
  in.key = in.value = TensorView::F32(memory.data(), {s, 24});
  auto want = layer->Forward(in);
  ASSERT_TRUE(want.ok());
  EXPECT_LE(MaxAbsDiff(got[0]->output.values, want->output.values), 1e-6);
}

TEST(CachedAttentionTest, BadAppendsFailAloneWithTheField) {
  std::mt19937_64 rng(9);
  MhaConfig config;
  config.embed_dim = 16;
  config.num_heads = 2;
  const auto layer = MakeLayer(config, testing::RandomTestWeights(config, rng));
  auto pool = MakePool(4);
  KvSequence good(pool.get(), 16), wrong_width(pool.get(), 8);
  const std::vector<float> x = RandomValues(rng, 3 * 16);
  CachedAppend ok{.query = x.data(), .tokens = 3, .cache = &good};
  CachedAppend empty{.query = x.data(), .tokens = 0, .cache = &good};
  CachedAppend width{.query = x.data(), .tokens = 1, .cache = &wrong_width};
  const CachedAppend* all[] = {&empty, &ok, &width};
  auto got = layer->ForwardAppends(all);
  EXPECT_NE(got[0].status().message().find("query"), std::string::npos) << got[0].status();
  EXPECT_TRUE(got[1].ok()) << got[1].status();
  EXPECT_NE(got[2].status().message().find("width"), std::string::npos) << got[2].status();
}

}  // namespace
}  // namespace attnserve
