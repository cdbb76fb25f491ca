// BFLOAT16 compute: the f32 -> bf16 conversion kernels against the scalar round-to-nearest-even, and bf16
// layers (self- and cross-attention with masks and weights, sessions' appends, decoder layers with GQA,
// RoPE and a window) against the float64 references: max abs error <= 3e-2 with unit-variance inputs,
// relative error of the output's norm <= 1e-2. Each also differs from the f32 layer's answer, so the bf16
// path did run; every primitive is a real one (no ref:).
#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>

#include "core/bf16_rows.h"
#include "core/decoder_attention.h"
#include "common/half_float.h"
#include "core/kv_cache_pool.h"
#include "core/multihead_attention.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_decoder.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

using testing::RandomValues;

bool Bf16Runs() { return OnednnBf16Support() != Bf16Support::kUnavailable; }

// Values that exercise rounding: random magnitudes, exact ties, the largest finite, infinities and NaN.
std::vector<float> ConversionInputs(std::mt19937_64& rng, int64_t n) {
  std::vector<float> v = RandomValues(rng, n);
  std::uniform_int_distribution<int> exp(-100, 100);
  for (int64_t i = 0; i < n; i += 3) v[i] = std::ldexp(v[i], exp(rng));
  const float specials[] = {0.0f, -0.0f, 1.0f + std::ldexp(1.0f, -8), 1.0f + 3 * std::ldexp(1.0f, -8),
                            std::numeric_limits<float>::max(), -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()};
  for (size_t i = 0; i < std::size(specials) && i < static_cast<size_t>(n); ++i) v[i * 7 % n] = specials[i];
  return v;
}

// Same bits, except that NaN only has to stay NaN.
void ExpectSameBf16(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want, const char* variant) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(BFloat16ToFloat(want[i]))) {
      EXPECT_TRUE(std::isnan(BFloat16ToFloat(got[i]))) << variant << " at " << i;
    } else {
      ASSERT_EQ(got[i], want[i]) << variant << " at " << i << ": " << BFloat16ToFloat(want[i]);
    }
  }
}

TEST(Bf16RowsTest, EveryVariantRoundsToNearestEvenOnStridedRows) {
  std::mt19937_64 rng(1);
  for (int64_t cols : {1, 15, 16, 17, 31, 32, 33, 64, 100}) {
    const int64_t rows = 5, ld_src = cols + 3, ld_dst = cols + 1;
    std::vector<float> src = ConversionInputs(rng, rows * ld_src);
    // vcvtneps2bf16 flushes denormals (documented in bf16_rows.h); the others keep them. Keep them out.
    for (float& x : src) {
      if (x != 0 && std::abs(x) < std::numeric_limits<float>::min()) x = 1.0f;
    }
    std::vector<uint16_t> want(rows * ld_dst, 0xABCD), got;
    FloatRowsToBf16Scalar(src.data(), rows, cols, ld_src, want.data(), ld_dst);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(want[r * ld_dst + c], FloatToBFloat16(src[r * ld_src + c]));
      for (int64_t c = cols; c < ld_dst; ++c) ASSERT_EQ(want[r * ld_dst + c], 0xABCD) << "wrote past the row";
    }
    if (CpuHasAvx512F()) {
      got.assign(rows * ld_dst, 0xABCD);
      FloatRowsToBf16Avx512F(src.data(), rows, cols, ld_src, got.data(), ld_dst);
      ExpectSameBf16(got, want, "avx512f");
    }
    if (CpuHasAvx512Bf16()) {
      got.assign(rows * ld_dst, 0xABCD);
      FloatRowsToBf16Avx512Bf16(src.data(), rows, cols, ld_src, got.data(), ld_dst);
      ExpectSameBf16(got, want, "avx512bf16");
    }
    got.assign(rows * ld_dst, 0xABCD);
    FloatRowsToBf16Parallel(src.data(), rows, cols, ld_src, got.data(), ld_dst);
    ExpectSameBf16(got, want, Bf16ConversionKernel());
  }
}

TEST(Bf16RowsTest, ParallelSplitCoversEveryRow) {
  std::mt19937_64 rng(2);
  const int64_t rows = 1001, cols = 257;
  const std::vector<float> src = RandomValues(rng, rows * cols);
  std::vector<uint16_t> want(rows * cols), got(rows * cols);
  FloatRowsToBf16Scalar(src.data(), rows, cols, cols, want.data(), cols);
  FloatRowsToBf16Parallel(src.data(), rows, cols, cols, got.data(), cols);
  EXPECT_EQ(got, want);
}

// Max abs error and the relative error of the norm against a float64 reference.
struct Error {
  double max_abs = 0, rel_norm = 0;
};

Error Compare(const std::vector<float>& got, const std::vector<double>& want) {
  EXPECT_EQ(got.size(), want.size());
  Error e;
  double err2 = 0, ref2 = 0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    const double d = std::abs(got[i] - want[i]);
    e.max_abs = std::max(e.max_abs, std::isnan(d) ? INFINITY : d);
    err2 += d * d;
    ref2 += want[i] * want[i];
  }
  e.rel_norm = std::sqrt(err2 / std::max(ref2, 1e-30));
  return e;
}

void ExpectBf16Close(const std::vector<float>& got, const std::vector<double>& want, const std::string& what) {
  const Error e = Compare(got, want);
  EXPECT_LE(e.max_abs, 3e-2) << what;
  EXPECT_LE(e.rel_norm, 1e-2) << what;
  if (Bf16Runs()) {
    EXPECT_GT(e.max_abs, 1e-6) << what << ": no bf16 rounding seen";
  }
}

std::unique_ptr<MultiheadAttention> MhaLayer(const MhaConfig& c, const MhaWeights& w, int64_t scores_block_bytes) {
  MultiheadAttention::Options o;
  o.config = c;
  o.compute = ComputeType::kBFloat16;
  o.scores_block_bytes = scores_block_bytes;
  // Small blocks keep the blocked path's bf16 matmuls covered where short requests would take ShortAttention.
  if (scores_block_bytes < 4096) o.short_attention_max_len = 0;
  o.min_block_rows = 1;
  o.cache_span_bytes = 4096;
  auto layer = MultiheadAttention::Create(o, w);
  EXPECT_TRUE(layer.ok()) << layer.status();
  EXPECT_EQ((*layer)->compute(), Bf16Runs() ? ComputeType::kBFloat16 : ComputeType::kFloat32);
  return std::move(*layer);
}

void ExpectNoReferenceKernels(const std::vector<std::string>& impls) {
  EXPECT_FALSE(impls.empty());
  for (const std::string& impl : impls) EXPECT_THAT(impl, ::testing::Not(::testing::StartsWith("ref")));
}

TEST(MhaBf16Test, SelfAndCrossAttentionWithMasksAndWeights) {
  std::mt19937_64 rng(3);
  for (const MhaConfig& c : {MhaConfig{256, 4, 0, 0, true}, MhaConfig{96, 6, 40, 24, false}}) {
    const MhaWeights w = testing::RandomTestWeights(c, rng);
    // Whole-batch blocks and one-row blocks (threads and blocking both covered).
    for (int64_t block_bytes : {int64_t{4} << 20, int64_t{64}}) {
      auto layer = MhaLayer(c, w, block_bytes);
      // need_weights off takes the fused softmax-to-bf16 path; on, the f32 probabilities are kept.
      for (int weights_mode : {0, 1, 2}) {
        const bool need_weights = weights_mode > 0, average = weights_mode == 1;
        const int64_t b = 3, l = 37, s = c.same_qkv_dim() ? l : 29;
        const auto q = RandomValues(rng, b * l * c.embed_dim);
        const auto k = RandomValues(rng, b * s * c.key_dim());
        const auto v = RandomValues(rng, b * s * c.value_dim());
        std::vector<uint8_t> pad(b * s, 0);
        for (int64_t i = 0; i < b; ++i) pad[i * s + s - 1 - i] = 1;
        std::fill_n(pad.begin() + 2 * s, s, 1);  // sequence 2: every key padded, rows answer zero attention
        AttentionInputs in;
        in.query = TensorView::F32(q.data(), {b, l, c.embed_dim});
        if (!c.same_qkv_dim()) {
          in.key = TensorView::F32(k.data(), {b, s, c.key_dim()});
          in.value = TensorView::F32(v.data(), {b, s, c.value_dim()});
        }
        in.key_padding_mask = TensorView::Bool(pad.data(), {b, s});
        in.is_causal = c.same_qkv_dim();
        in.need_weights = need_weights;
        in.average_attn_weights = average;
        for (int threads : {1, 2}) {
          auto got = layer->Forward(in, threads);
          ASSERT_TRUE(got.ok()) << got.status();
          const testing::NaiveOutputs ref = testing::NaiveMultiheadAttention(c, w, in);
          ExpectBf16Close(got->output.values, ref.output, c.DebugString());
          if (need_weights) {
            EXPECT_LE(testing::MaxAbsDiff(got->attn_weights.values, ref.attn_weights), 1e-2);
          }
        }
      }
      ExpectNoReferenceKernels(layer->ImplementationsUsed());
    }
  }
}

TEST(MhaBf16Test, RaggedBatchMembersEachNearTheirReference) {
  std::mt19937_64 rng(4);
  const MhaConfig c{128, 4, 0, 0, true};
  const MhaWeights w = testing::RandomTestWeights(c, rng);
  auto layer = MhaLayer(c, w, int64_t{4} << 20);
  std::vector<std::vector<float>> data;
  std::vector<AttentionInputs> inputs(6);
  for (size_t i = 0; i < inputs.size(); ++i) {
    const int64_t len = 1 + static_cast<int64_t>(i) * 13;
    data.push_back(RandomValues(rng, len * c.embed_dim));
    inputs[i].query = TensorView::F32(data.back().data(), {1, len, c.embed_dim});
    inputs[i].is_causal = i % 2 == 0;
  }
  std::vector<const AttentionInputs*> ptrs;
  for (const AttentionInputs& in : inputs) ptrs.push_back(&in);
  auto got = layer->ForwardBatch(ptrs, 2);
  for (size_t i = 0; i < inputs.size(); ++i) {
    ASSERT_TRUE(got[i].ok()) << got[i].status();
    const Error e = Compare(got[i]->output.values, testing::NaiveMultiheadAttention(c, w, inputs[i]).output);
    EXPECT_LE(e.max_abs, 3e-2) << "member " << i;
    EXPECT_LE(e.rel_norm, 1e-2) << "member " << i;
  }
}

TEST(MhaBf16Test, SessionAppendsNearCausalReference) {
  std::mt19937_64 rng(5);
  const MhaConfig c{64, 4, 0, 0, true};
  const MhaWeights w = testing::RandomTestWeights(c, rng);
  auto layer = MhaLayer(c, w, 256);
  auto pool = KvCachePool::Create({.kv_cache_bytes = int64_t{64} << 20, .block_tokens = 8});
  ASSERT_TRUE(pool.ok()) << pool.status();
  const int64_t n = 45;
  const std::vector<float> x = RandomValues(rng, n * c.embed_dim);
  KvSequence cache(pool->get(), c.embed_dim);
  std::vector<float> outputs;
  for (int64_t begin = 0, step = 1; begin < n; begin += step, step = step % 7 + 2) {
    CachedAppend a;
    a.query = x.data() + begin * c.embed_dim;
    a.tokens = std::min(step, n - begin);
    a.cache = &cache;
    const CachedAppend* one[] = {&a};
    auto got = layer->ForwardAppends(one);
    ASSERT_TRUE(got[0].ok()) << got[0].status();
    outputs.insert(outputs.end(), got[0]->output.values.begin(), got[0]->output.values.end());
  }
  AttentionInputs whole;
  whole.query = TensorView::F32(x.data(), {1, n, c.embed_dim});
  whole.is_causal = true;
  ExpectBf16Close(outputs, testing::NaiveMultiheadAttention(c, w, whole).output, "appends");
  ExpectNoReferenceKernels(layer->ImplementationsUsed());
}

TEST(DecoderBf16Test, GqaRopeWindowNearReference) {
  std::mt19937_64 rng(6);
  DecoderAttention::Options o;
  o.config.embed_dim = 128;
  o.config.num_heads = 8;
  o.config.num_kv_heads = 2;
  o.config.head_dim = 16;
  o.config.qkv_bias = true;
  o.config.sliding_window = 9;
  o.config.rope.rotary_dim = 16;
  o.scores_block_bytes = 2048;
  o.min_block_rows = 1;
  o.compute = ComputeType::kBFloat16;
  const DecoderWeights w = RandomDecoderWeights(o.config, 7);
  auto layer = DecoderAttention::Create(o, w);
  ASSERT_TRUE(layer.ok()) << layer.status();
  EXPECT_EQ((*layer)->compute(), Bf16Runs() ? ComputeType::kBFloat16 : ComputeType::kFloat32);
  const int64_t b = 2, l = 33;
  const std::vector<float> x = RandomValues(rng, b * l * o.config.embed_dim);
  DecoderInputs in;
  in.query = TensorView::F32(x.data(), {b, l, o.config.embed_dim});
  in.position_offset = 5;
  in.need_weights = true;
  for (int threads : {1, 2}) {
    auto got = (*layer)->Forward(in, threads);
    ASSERT_TRUE(got.ok()) << got.status();
    const testing::NaiveOutputs ref = testing::NaiveDecoderAttention(o.config, w, in);
    ExpectBf16Close(got->output.values, ref.output, "decoder");
    EXPECT_LE(testing::MaxAbsDiff(got->attn_weights.values, ref.attn_weights), 1e-2);
  }
  ExpectNoReferenceKernels((*layer)->ImplementationsUsed());
}

TEST(Bf16SupportTest, ReportsWhatThisCpuDoes) {
  const Bf16Support support = OnednnBf16Support();
  std::cout << "bf16 matmul: " << Bf16SupportName(support) << ", conversion kernel: " << Bf16ConversionKernel()
            << "\n";
  // ONEDNN_MAX_CPU_ISA (ctest runs this binary with AVX512_CORE and AVX2 too) lowers what oneDNN uses.
  const bool isa_capped = std::getenv("ONEDNN_MAX_CPU_ISA") != nullptr || std::getenv("DNNL_MAX_CPU_ISA") != nullptr;
  if (CpuHasAvx512Bf16() && !isa_capped) {
    EXPECT_EQ(support, Bf16Support::kNative);
  }
  // A weights check of the bf16 LinearOp itself: y = x W^T with W rounded once.
  const int64_t k = 40, n = 24, m = 7;
  std::mt19937_64 rng(8);
  const std::vector<float> w = RandomValues(rng, n * k), x = RandomValues(rng, m * k);
  auto op = LinearOp::Create(k, n, w, {}, ComputeType::kBFloat16);
  if (support == Bf16Support::kUnavailable) {
    EXPECT_FALSE(op.ok());
    return;
  }
  ASSERT_TRUE(op.ok()) << op.status();
  std::vector<float> y(m * n);
  ASSERT_TRUE((*op)->Execute(x.data(), m, k, y.data(), n).ok());
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double want = 0;
      for (int64_t t = 0; t < k; ++t) {
        want += static_cast<double>(BFloat16ToFloat(FloatToBFloat16(x[i * k + t]))) *
                BFloat16ToFloat(FloatToBFloat16(w[j * k + t]));
      }
      EXPECT_NEAR(y[i * n + j], want, 1e-4) << i << "," << j;  // only f32 accumulation differs
    }
  }
  EXPECT_THAT((*op)->Impls(), ::testing::Each(::testing::Not(::testing::StartsWith("ref"))));
}

}  // namespace
}  // namespace attnserve
