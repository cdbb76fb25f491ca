// Activations as they come on the wire (core/activation_rows.h): the vector conversions against the scalar
// ones on every 16-bit pattern, the gathers of mixed f32 / bf16 / f16 rows at any alignment, and the engines
// (multi-head in f32 and bf16, flash path included; decoder) given 16-bit inputs: the same answers as for
// the same values widened to f32, request by request inside ragged batches; session appends (both layer
// kinds) likewise, batched and alone.
#include "core/activation_rows.h"

#include <omp.h>

#include <cmath>
#include <cstring>
#include <random>

#include "core/bf16_rows.h"
#include "core/decoder_attention.h"
#include "core/kv_cache_pool.h"
#include "common/half_float.h"
#include "core/multihead_attention.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_decoder.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

using testing::RandomValues;

// Every 16-bit pattern, stored one byte past an aligned address (the wire's bytes may sit anywhere).
std::vector<unsigned char> AllPatternsUnaligned() {
  std::vector<unsigned char> bytes(2 * 65536 + 1);
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t bits = static_cast<uint16_t>(i);
    std::memcpy(bytes.data() + 1 + 2 * i, &bits, 2);
  }
  return bytes;
}

void ExpectSameFloats(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(want[i])) {
      EXPECT_TRUE(std::isnan(got[i])) << what << " at " << i;
    } else {
      ASSERT_EQ(std::memcmp(&got[i], &want[i], 4), 0) << what << " at pattern " << i << ": " << want[i];
    }
  }
}

TEST(ActivationRowsTest, VectorConversionsMatchScalarOnEveryPattern) {
  const std::vector<unsigned char> bytes = AllPatternsUnaligned();
  std::vector<float> got(65536), want(65536);
  HalfToFloatValues(bytes.data() + 1, 65536, got.data());
  HalfToFloatValuesScalar(bytes.data() + 1, 65536, want.data());
  ExpectSameFloats(got, want, "f16");
  EXPECT_EQ(want[0x3C00], 1.0f);
  EXPECT_EQ(want[0x0001], std::ldexp(1.0f, -24));  // the smallest subnormal, exactly
  Bf16ToFloatValues(bytes.data() + 1, 65536, got.data());
  Bf16ToFloatValuesScalar(bytes.data() + 1, 65536, want.data());
  ExpectSameFloats(got, want, "bf16");
  EXPECT_EQ(want[0x3F80], 1.0f);
  // Odd counts leave a scalar tail after the vector body.
  HalfToFloatValues(bytes.data() + 1, 13, got.data());
  HalfToFloatValuesScalar(bytes.data() + 1, 13, want.data());
  for (int i = 0; i < 13; ++i) EXPECT_EQ(std::memcmp(&got[i], &want[i], 4), 0) << i;
}

TEST(ActivationRowsTest, HalfToBf16RoundsItsExactF32Value) {
  const std::vector<unsigned char> bytes = AllPatternsUnaligned();
  std::vector<uint16_t> got(65536);
  HalfToBf16Values(bytes.data() + 1, 65536, got.data());
  for (uint32_t i = 0; i < 65536; ++i) {
    const float exact = HalfToFloat(static_cast<uint16_t>(i));
    if (std::isnan(exact)) {
      EXPECT_TRUE(std::isnan(BFloat16ToFloat(got[i]))) << i;
    } else {
      ASSERT_EQ(got[i], FloatToBFloat16(exact)) << "f16 pattern " << i << " = " << exact;
    }
  }
}

// Values of one dtype at a chosen byte offset, and their exact f32 values.
struct StoredRows {
  DType dtype;
  std::vector<unsigned char> bytes;
  std::vector<float> widened;
  const void* data(size_t offset) const { return bytes.data() + offset; }
};

StoredRows Store(const std::vector<float>& values, DType dtype, size_t offset) {
  StoredRows s{dtype, std::vector<unsigned char>(values.size() * DTypeSize(dtype) + offset), values};
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == DType::kFloat32) {
      std::memcpy(s.bytes.data() + offset + 4 * i, &values[i], 4);
      continue;
    }
    const uint16_t bits = dtype == DType::kBFloat16 ? FloatToBFloat16(values[i]) : FloatToHalf(values[i]);
    s.widened[i] = dtype == DType::kBFloat16 ? BFloat16ToFloat(bits) : HalfToFloat(bits);
    std::memcpy(s.bytes.data() + offset + 2 * i, &bits, 2);
  }
  return s;
}

TEST(ActivationRowsTest, GathersMixedRowsAtAnyAlignment) {
  std::mt19937_64 rng(11);
  const int64_t cols = 96;
  // Small views (serial) and one past the parallel threshold, each dtype aligned and not.
  const DType dtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16, DType::kFloat32,
                          DType::kBFloat16, DType::kFloat16, DType::kFloat32};
  const int64_t view_rows[] = {3, 1, 7, 5, 900, 2, 1};
  std::vector<StoredRows> stored;
  std::vector<TensorView> views;
  int64_t rows = 0;
  for (size_t i = 0; i < std::size(dtypes); ++i) {
    const size_t offset = i % 2;
    stored.push_back(Store(RandomValues(rng, view_rows[i] * cols), dtypes[i], offset));
  }
  std::vector<float> want_f32;
  std::vector<uint16_t> want_bf16;
  for (size_t i = 0; i < stored.size(); ++i) {
    views.push_back({dtypes[i], {view_rows[i], cols}, stored[i].data(i % 2)});
    rows += view_rows[i];
    want_f32.insert(want_f32.end(), stored[i].widened.begin(), stored[i].widened.end());
  }
  want_bf16.resize(want_f32.size());
  FloatRowsToBf16Scalar(want_f32.data(), 1, static_cast<int64_t>(want_f32.size()), 0, want_bf16.data(), 0);
  std::vector<const TensorView*> ptrs;
  for (const TensorView& v : views) ptrs.push_back(&v);
  for (int threads : {1, 2}) {
    omp_set_num_threads(threads);
    std::vector<float> f32_buf;
    const float* f32 = ActivationRowsF32(ptrs, rows, cols, f32_buf);
    EXPECT_EQ(std::vector<float>(f32, f32 + rows * cols), want_f32) << threads << " threads";
    std::vector<uint16_t> bf16_buf;
    const uint16_t* bf16 = ActivationRowsBf16(ptrs, rows, cols, bf16_buf);
    EXPECT_EQ(std::vector<uint16_t>(bf16, bf16 + rows * cols), want_bf16) << threads << " threads";
  }
}

TEST(ActivationRowsTest, ReadsOneRequestInPlaceWhenItsTypeIsTheMatmuls) {
  std::mt19937_64 rng(12);
  const StoredRows f32 = Store(RandomValues(rng, 4 * 32), DType::kFloat32, 0);
  const StoredRows bf16 = Store(RandomValues(rng, 4 * 32), DType::kBFloat16, 0);
  const TensorView f32_view{DType::kFloat32, {4, 32}, f32.data(0)};
  const TensorView bf16_view{DType::kBFloat16, {4, 32}, bf16.data(0)};
  const TensorView* one_f32[] = {&f32_view};
  const TensorView* one_bf16[] = {&bf16_view};
  std::vector<float> f32_buf;
  std::vector<uint16_t> bf16_buf;
  EXPECT_EQ(ActivationRowsF32(one_f32, 4, 32, f32_buf), f32.data(0));
  EXPECT_EQ(ActivationRowsBf16(one_bf16, 4, 32, bf16_buf), bf16.data(0));
  EXPECT_TRUE(f32_buf.empty());
  EXPECT_TRUE(bf16_buf.empty());
  // The other type is converted into the buffer.
  const float* widened = ActivationRowsF32(one_bf16, 4, 32, f32_buf);
  EXPECT_EQ(widened, f32_buf.data());
  EXPECT_EQ(widened[5], bf16.widened[5]);
  const uint16_t* rounded = ActivationRowsBf16(one_f32, 4, 32, bf16_buf);
  EXPECT_EQ(rounded, bf16_buf.data());
  EXPECT_EQ(rounded[5], FloatToBFloat16(f32.widened[5]));
}

// One request of random shape whose query, key and value each come in a random dtype at a random alignment,
// and the same request with their widened values in f32.
struct WireRequest {
  std::vector<StoredRows> stored;
  std::vector<uint8_t> pad;
  AttentionInputs wire, widened;
};

std::unique_ptr<WireRequest> RandomWireRequest(std::mt19937_64& rng, const MhaConfig& c, int64_t max_len) {
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  auto r = std::make_unique<WireRequest>();
  const bool self = c.same_qkv_dim() && pick(0, 2) != 0;
  const int64_t b = pick(1, 2), l = pick(1, max_len), s = self ? l : pick(1, max_len);
  const DType dtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  auto add = [&](TensorView AttentionInputs::*field, Shape shape) {
    const size_t offset = static_cast<size_t>(pick(0, 1));
    r->stored.push_back(Store(RandomValues(rng, NumElements(shape)), dtypes[pick(0, 2)], offset));
    const StoredRows& st = r->stored.back();
    r->wire.*field = {st.dtype, shape, st.data(offset)};
    r->widened.*field = TensorView::F32(st.widened.data(), shape);
  };
  r->stored.reserve(3);
  add(&AttentionInputs::query, {b, l, c.embed_dim});
  if (!self) {
    add(&AttentionInputs::key, {b, s, c.key_dim()});
    add(&AttentionInputs::value, {b, s, c.value_dim()});
  }
  for (int64_t i = 0; i < b * s; ++i) r->pad.push_back(pick(0, 5) == 0);
  for (AttentionInputs* in : {&r->wire, &r->widened}) {
    in->key_padding_mask = TensorView::Bool(r->pad.data(), {b, s});
    in->is_causal = self && pick(0, 1) == 0;
    in->need_weights = pick(0, 3) == 0;
  }
  r->widened.is_causal = r->wire.is_causal;
  r->widened.need_weights = r->wire.need_weights;
  return r;
}

void ExpectSameAnswers(const std::vector<absl::StatusOr<AttentionOutputs>>& got,
                       const std::vector<absl::StatusOr<AttentionOutputs>>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(got[i].ok()) << what << " member " << i << ": " << got[i].status();
    ASSERT_TRUE(want[i].ok()) << want[i].status();
    EXPECT_EQ(got[i]->output.shape, want[i]->output.shape);
    EXPECT_LE(testing::MaxAbsDiff(got[i]->output.values, want[i]->output.values), 1e-6) << what << " member " << i;
    EXPECT_LE(testing::MaxAbsDiff(got[i]->attn_weights.values, want[i]->attn_weights.values), 1e-6);
  }
}

TEST(ActivationRowsTest, MultiheadLayersAnswer16BitInputsAsTheirF32Values) {
  std::mt19937_64 rng(13);
  for (const MhaConfig& c : {MhaConfig{64, 4, 0, 0, true}, MhaConfig{48, 4, 40, 24, false}}) {
    const MhaWeights w = testing::RandomTestWeights(c, rng);
    for (ComputeType compute : {ComputeType::kFloat32, ComputeType::kBFloat16}) {
      MultiheadAttention::Options o;
      o.config = c;
      o.compute = compute;
      o.flash_min_keys = 48;  // the longer requests take the flash path
      o.single_thread_below_flops = 0;
      auto layer = MultiheadAttention::Create(o, w);
      ASSERT_TRUE(layer.ok()) << layer.status();
      const std::string what = c.DebugString() + " in " + ComputeTypeName((*layer)->compute());
      for (int round = 0; round < 6; ++round) {
        std::vector<std::unique_ptr<WireRequest>> owned;
        std::vector<const AttentionInputs*> wire, widened;
        for (int i = 0; i < 1 + round; ++i) {  // a lone request first: read in place where it can be
          owned.push_back(RandomWireRequest(rng, c, 70));
          wire.push_back(&owned.back()->wire);
          widened.push_back(&owned.back()->widened);
        }
        for (int threads : {1, 2}) {
          ExpectSameAnswers((*layer)->ForwardBatch(wire, threads), (*layer)->ForwardBatch(widened, threads), what);
        }
      }
    }
  }
}

// A GQA layer (E=64, 4 query heads over 2 kv heads, RoPE) with random weights.
absl::StatusOr<std::unique_ptr<DecoderAttention>> SmallDecoder(ComputeType compute, uint64_t seed) {
  DecoderAttention::Options o;
  o.config.embed_dim = 64;
  o.config.num_heads = 4;
  o.config.num_kv_heads = 2;
  o.config.head_dim = 16;
  o.config.rope.rotary_dim = 16;
  o.compute = compute;
  o.single_thread_below_flops = 0;
  return DecoderAttention::Create(o, RandomDecoderWeights(o.config, seed));
}

TEST(ActivationRowsTest, DecoderLayersAnswer16BitQueriesAsTheirF32Values) {
  std::mt19937_64 rng(14);
  for (ComputeType compute : {ComputeType::kFloat32, ComputeType::kBFloat16}) {
    auto layer = SmallDecoder(compute, 15);
    ASSERT_TRUE(layer.ok()) << layer.status();
    std::vector<StoredRows> stored;
    std::vector<DecoderInputs> wire(4), widened(4);
    const DType dtypes[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32, DType::kBFloat16};
    stored.reserve(4);
    for (size_t i = 0; i < 4; ++i) {
      const int64_t len = 5 + 9 * static_cast<int64_t>(i);
      stored.push_back(Store(RandomValues(rng, len * 64), dtypes[i], i % 2));
      wire[i].query = {dtypes[i], {len, 64}, stored.back().data(i % 2)};
      widened[i].query = TensorView::F32(stored.back().widened.data(), {len, 64});
    }
    std::vector<ParsedDecoder> parsed_wire, parsed_widened;
    for (size_t i = 0; i < 4; ++i) {
      auto p = (*layer)->Validate(wire[i]);
      ASSERT_TRUE(p.ok()) << p.status();
      parsed_wire.push_back(*p);
      parsed_widened.push_back(*(*layer)->Validate(widened[i]));
    }
    std::vector<const ParsedDecoder*> a, b;
    for (size_t i = 0; i < 4; ++i) {
      a.push_back(&parsed_wire[i]);
      b.push_back(&parsed_widened[i]);
    }
    ExpectSameAnswers((*layer)->ForwardBatch(a, 2), (*layer)->ForwardBatch(b, 2), ComputeTypeName(compute));
    // Alone, a bf16 query is read in place by a bf16 layer.
    ExpectSameAnswers((*layer)->ForwardBatch({a.data(), 1}, 2), (*layer)->ForwardBatch({b.data(), 1}, 2), "alone");
  }
}

// Appends of sessions (AppendEngine::ForwardAppends) whose queries come as bf16, f16 or f32 at odd offsets,
// batched and then alone: the answers, and the caches they leave (the next append reads them), of the same
// appends in f32.
void ExpectAppendsAsTheirF32Values(const AppendEngine& engine, std::mt19937_64& rng, const std::string& what) {
  auto pool = KvCachePool::Create({.kv_cache_bytes = int64_t{64} << 20, .block_tokens = 8});
  ASSERT_TRUE(pool.ok()) << pool.status();
  const int64_t e = engine.embed_dim();
  const DType dtypes[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32, DType::kBFloat16};
  const int64_t lens[] = {1, 13, 4, 30};
  const std::vector<float> prefix = RandomValues(rng, 10 * e);
  std::vector<KvSequence> caches;  // [2i]: appends of 16-bit rows, [2i + 1]: of their f32 values
  caches.reserve(8);
  for (int i = 0; i < 8; ++i) {
    caches.emplace_back(pool->get(), engine.cache_width());
    CachedAppend p{.query = prefix.data(), .tokens = 10, .cache = &caches.back()};
    const CachedAppend* one[] = {&p};
    ASSERT_TRUE(engine.ForwardAppends(one)[0].ok());
  }
  std::vector<StoredRows> stored;
  stored.reserve(5);
  std::vector<CachedAppend> wire(4), widened(4);
  std::vector<const CachedAppend*> a, b;
  for (size_t i = 0; i < 4; ++i) {
    const size_t offset = i % 2;
    stored.push_back(Store(RandomValues(rng, lens[i] * e), dtypes[i], offset));
    wire[i] = {.query = stored.back().data(offset), .tokens = lens[i], .cache = &caches[2 * i],
               .need_weights = i == 1, .query_dtype = dtypes[i]};
    widened[i] = {.query = stored.back().widened.data(), .tokens = lens[i], .cache = &caches[2 * i + 1],
                  .need_weights = i == 1};
    a.push_back(&wire[i]);
    b.push_back(&widened[i]);
  }
  ExpectSameAnswers(engine.ForwardAppends(a, 2), engine.ForwardAppends(b, 2), what + ", batched");
  // Alone, an aligned bf16 query (read in place by a bf16 layer) over the caches the batch left.
  stored.push_back(Store(RandomValues(rng, 6 * e), DType::kBFloat16, 0));
  CachedAppend alone{.query = stored.back().data(0), .tokens = 6, .cache = &caches[6], .query_dtype = DType::kBFloat16};
  CachedAppend alone_f32{.query = stored.back().widened.data(), .tokens = 6, .cache = &caches[7]};
  const CachedAppend* one[] = {&alone};
  const CachedAppend* one_f32[] = {&alone_f32};
  ExpectSameAnswers(engine.ForwardAppends(one, 2), engine.ForwardAppends(one_f32, 2), what + ", alone");
}

TEST(ActivationRowsTest, SessionAppendsAnswer16BitQueriesAsTheirF32Values) {
  std::mt19937_64 rng(16);
  for (ComputeType compute : {ComputeType::kFloat32, ComputeType::kBFloat16}) {
    MultiheadAttention::Options mo;
    mo.config = MhaConfig{64, 4, 0, 0, true};
    mo.compute = compute;
    mo.single_thread_below_flops = 0;
    auto mha = MultiheadAttention::Create(mo, testing::RandomTestWeights(mo.config, rng));
    ASSERT_TRUE(mha.ok()) << mha.status();
    ExpectAppendsAsTheirF32Values(**mha, rng, std::string("multi-head in ") + ComputeTypeName(compute));
    auto decoder = SmallDecoder(compute, 17);
    ASSERT_TRUE(decoder.ok()) << decoder.status();
    ExpectAppendsAsTheirF32Values(**decoder, rng, std::string("decoder in ") + ComputeTypeName(compute));
  }
}

}  // namespace
}  // namespace attnserve
