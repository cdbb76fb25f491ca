// ShortAttention (core/short_attention.h): short sequences' heads through two fixed-size batched bf16 matmuls on bf16
// brgemm kernels (AMX or AVX512_BF16). Against a float64 reference over Q, K and V rounded to bf16, on lengths that pad
// (1, 15, 17, 61) and that do not, head groups in the middle of the heads, masks with rows masked whole, NaN left in a
// thread's buffers by an earlier request, the shape cache's bound; and through MultiheadAttention: which requests take
// it, head groups over the threads, against the float64 reference and the layer without it.
#include "core/short_attention.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
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

using testing::RandomValues;

float RoundToBf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits += 0x7fff + ((bits >> 16) & 1);
  bits &= 0xffff0000u;
  std::memcpy(&x, &bits, sizeof(bits));
  return x;
}

// Q, K and V of `batch` sequences as one fused projection: rows of 3E floats (Q, K, V side by side).
struct Fused {
  int64_t batch, len, heads, dh;
  std::vector<float> rows;  // [batch * len, 3E]
  int64_t e() const { return heads * dh; }
  ShortAttention::Args Args(std::vector<float>* out) const {
    ShortAttention::Args a;
    a.q_len = a.kv_len = len;
    const int64_t ld = 3 * e();
    a.q = {rows.data(), ld, len * ld};
    a.k = {rows.data() + e(), ld, len * ld};
    a.v = {rows.data() + 2 * e(), ld, len * ld};
    out->assign(static_cast<size_t>(batch * len * e()), -7.0f);  // -7: not written
    a.out = out->data();
    a.out_ld = e();
    a.out_seq_stride = len * e();
    return a;
  }
};

// Causal masks, and row 0 of every head masked whole when `kill_row0`: the reference's masks.
bool Masked(int64_t i, int64_t j, bool kill_row0) { return j > i || (kill_row0 && i == 0); }

// Row 0 is masked whole in even sequences only, so that a call of several sequences must give each its own.
bool KillsRow0(bool kill_row0, int64_t b) { return kill_row0 && b % 2 == 0; }

// Context of sequence b, head h from bf16-rounded operands in float64: [len, dh].
std::vector<double> Reference(const Fused& f, int64_t b, int64_t h, bool masked, bool kill_row0) {
  const int64_t ld = 3 * f.e(), dh = f.dh;
  auto at = [&](int64_t part, int64_t i, int64_t d) {
    return static_cast<double>(RoundToBf16(f.rows[(b * f.len + i) * ld + part * f.e() + h * dh + d]));
  };
  std::vector<double> ctx(static_cast<size_t>(f.len * dh), 0.0);
  for (int64_t i = 0; i < f.len; ++i) {
    std::vector<double> p(static_cast<size_t>(f.len));
    double max = -INFINITY, sum = 0;
    for (int64_t j = 0; j < f.len; ++j) {
      double s = 0;
      for (int64_t d = 0; d < dh; ++d) s += at(0, i, d) * at(1, j, d);
      p[j] = masked && Masked(i, j, kill_row0) ? -INFINITY : s;
      max = std::max(max, p[j]);
    }
    if (max == -INFINITY) continue;  // every key masked: zero context
    for (double& x : p) sum += x = std::exp(x - max);
    for (int64_t j = 0; j < f.len; ++j) {
      for (int64_t d = 0; d < dh; ++d) ctx[i * dh + d] += p[j] / sum * at(2, j, d);
    }
  }
  return ctx;
}

// The test's masks through ShortAttention's callback: adds -inf where Masked, names the rows masked whole.
struct TestMask {
  bool kill_row0;
  int64_t len;
  std::vector<uint8_t> dead;
  const uint8_t* operator()(int64_t b, int64_t, int64_t hb, float* scores, int64_t ld, int64_t head_rows) {
    const bool kill = KillsRow0(kill_row0, b);
    dead.assign(static_cast<size_t>(hb * len), 0);
    for (int64_t hi = 0; hi < hb; ++hi) {
      for (int64_t i = 0; i < len; ++i) {
        bool open = false;
        for (int64_t j = 0; j < len; ++j) {
          if (Masked(i, j, kill)) scores[(hi * head_rows + i) * ld + j] = -INFINITY;
          open = open || !Masked(i, j, kill);
        }
        dead[hi * len + i] = !open;
      }
    }
    return dead.data();
  }
};

std::unique_ptr<ShortAttention> MakeShort(int64_t dh, size_t capacity = 64) {
  auto attention = ShortAttention::Create({dh, 256, capacity});
  EXPECT_TRUE(attention.ok()) << attention.status();
  return attention.ok() ? std::move(*attention) : nullptr;
}

// Runs heads [h0, h0 + hb) of every sequence, `seqs_per_call` sequences a call (fewer in the last), and checks
// them against Reference; the other heads' columns must be left as they were.
void ExpectHeadsNearReference(const ShortAttention& attention, const Fused& f, int64_t h0, int64_t hb, bool masked,
                              bool kill_row0, int64_t seqs_per_call = 1) {
  std::vector<float> out;
  const ShortAttention::Args a = f.Args(&out);
  TestMask mask_state{kill_row0, f.len, {}};
  auto add_masks = [&](int64_t b, int64_t h, int64_t n, float* s, int64_t ld, int64_t rows) {
    return mask_state(b, h, n, s, ld, rows);
  };
  const ShortAttention::MaskFn mask = add_masks;
  for (int64_t b = 0; b < f.batch; b += seqs_per_call) {
    const absl::Status status =
        attention.Run(a, b, std::min(seqs_per_call, f.batch - b), h0, hb, masked ? &mask : nullptr);
    ASSERT_TRUE(status.ok()) << status;
  }
  double max_diff = 0;
  for (int64_t b = 0; b < f.batch; ++b) {
    for (int64_t h = 0; h < f.heads; ++h) {
      const bool ran = h >= h0 && h < h0 + hb;
      const bool kill = KillsRow0(kill_row0, b);
      const std::vector<double> want = ran ? Reference(f, b, h, masked, kill) : std::vector<double>();
      for (int64_t i = 0; i < f.len; ++i) {
        for (int64_t d = 0; d < f.dh; ++d) {
          const float got = out[(b * f.len + i) * f.e() + h * f.dh + d];
          if (!ran) {
            ASSERT_EQ(got, -7.0f) << "head " << h << " was not asked for";
          } else {
            max_diff = std::max(max_diff, std::abs(got - want[i * f.dh + d]));
          }
          if (ran && masked && kill && i == 0) {
            ASSERT_EQ(got, 0.0f) << "a row masked whole answers zero";
          }
        }
      }
    }
  }
  // Only P's rounding to bf16 is left (relative 2^-9 of each probability): well under 1e-2 for values in [-1, 1].
  EXPECT_LE(max_diff, 1e-2) << "len " << f.len << " heads [" << h0 << ", " << h0 + hb << ")";
  if (f.len > 1) {
    EXPECT_GT(max_diff, 0.0) << "no bf16 rounding seen";
  }
}

Fused RandomFused(std::mt19937_64& rng, int64_t batch, int64_t len, int64_t heads, int64_t dh) {
  Fused f{batch, len, heads, dh, RandomValues(rng, batch * len * 3 * heads * dh)};
  for (float& x : f.rows) x *= 0.5f;  // scores of a few units: softmax neither flat nor one-hot
  return f;
}

TEST(ShortAttentionTest, CreateChecksOptionsAndTheCpu) {
  EXPECT_TRUE(absl::IsInvalidArgument(ShortAttention::Create({0, 256, 64}).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(ShortAttention::Create({64, 0, 64}).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(ShortAttention::Create({64, 256, 0}).status()));
  EXPECT_TRUE(absl::IsUnimplemented(ShortAttention::Create({24, 256, 64}).status())) << "Dh not a multiple of 16";
  auto attention = ShortAttention::Create({64, 256, 64});
  if (!OnednnHasBf16Brgemm()) {  // the layers keep their blocked path: nothing else to test on this CPU
    EXPECT_TRUE(absl::IsUnimplemented(attention.status())) << attention.status();
    return;
  }
  ASSERT_TRUE(attention.ok()) << attention.status();
  EXPECT_TRUE((*attention)->Serves(1, 256));
  EXPECT_FALSE((*attention)->Serves(257, 16));
  EXPECT_FALSE((*attention)->Serves(16, 0));
}

TEST(ShortAttentionTest, HeadsNearTheFloat64Reference) {
  if (!OnednnHasBf16Brgemm()) GTEST_SKIP() << "no bf16 brgemm: CreateChecksOptionsAndTheCpu covers this CPU";
  std::mt19937_64 rng(11);
  for (int64_t dh : {int64_t{16}, int64_t{64}}) {
    auto attention = MakeShort(dh);
    ASSERT_NE(attention, nullptr);
    for (int64_t len : {int64_t{1}, int64_t{15}, int64_t{16}, int64_t{17}, int64_t{61}, int64_t{128}}) {
      const Fused f = RandomFused(rng, 2, len, 4, dh);
      ExpectHeadsNearReference(*attention, f, 0, 4, /*masked=*/false, false);
      ExpectHeadsNearReference(*attention, f, 1, 2, /*masked=*/true, /*kill_row0=*/len > 1);
    }
    EXPECT_GT(attention->executions(), 0);
    EXPECT_THAT(attention->Impls(), ::testing::Each(::testing::StartsWith(testing::ExpectedBf16Brgemm())));
  }
}

TEST(ShortAttentionTest, NanInAnEarlierRequestStaysThere) {
  if (!OnednnHasBf16Brgemm()) GTEST_SKIP() << "no bf16 brgemm: CreateChecksOptionsAndTheCpu covers this CPU";
  std::mt19937_64 rng(12);
  auto attention = MakeShort(64);
  ASSERT_NE(attention, nullptr);
  // 32 keys fill this thread's padded V rows with NaN; 17 keys then pad to 32 over them.
  Fused poisoned = RandomFused(rng, 1, 32, 2, 64);
  for (float& x : poisoned.rows) x = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> out;
  ASSERT_TRUE(attention->Run(poisoned.Args(&out), 0, 1, 0, 2, nullptr).ok());
  EXPECT_TRUE(std::isnan(out[0]));
  const Fused clean = RandomFused(rng, 1, 17, 2, 64);
  ExpectHeadsNearReference(*attention, clean, 0, 2, false, false);
}

// Several sequences in one call: each its own rows, heads and masks (row 0 masked whole in even sequences only),
// whole calls and a shorter last one, padded lengths and not.
TEST(ShortAttentionTest, SeveralSequencesInOneCall) {
  if (!OnednnHasBf16Brgemm()) GTEST_SKIP() << "no bf16 brgemm: CreateChecksOptionsAndTheCpu covers this CPU";
  std::mt19937_64 rng(16);
  auto attention = MakeShort(64);
  ASSERT_NE(attention, nullptr);
  for (int64_t len : {int64_t{9}, int64_t{16}, int64_t{33}}) {
    const Fused f = RandomFused(rng, 7, len, 4, 64);
    for (int64_t per_call : {int64_t{2}, int64_t{4}, int64_t{8}}) {
      const int64_t runs_before = attention->executions();
      ExpectHeadsNearReference(*attention, f, 0, 4, /*masked=*/true, /*kill_row0=*/true, per_call);
      ExpectHeadsNearReference(*attention, f, 1, 2, /*masked=*/false, false, per_call);
      EXPECT_EQ(attention->executions() - runs_before, 2 * f.batch) << "executions count sequences";
    }
  }
  std::vector<float> out;
  const Fused f = RandomFused(rng, 9, 16, 4, 64);
  for (int64_t bad : {int64_t{0}, ShortAttention::kMaxSequencesPerCall + 1}) {
    EXPECT_TRUE(absl::IsInvalidArgument(attention->Run(f.Args(&out), 0, bad, 0, 4, nullptr))) << bad;
  }
}

// Q, K and V given in bf16 (a projection that writes bf16, or the bf16 mirror) answer exactly as the f32 rows they
// round: the same values reach the matmuls.
TEST(ShortAttentionTest, Bf16OperandsAnswerAsTheF32Ones) {
  if (!OnednnHasBf16Brgemm()) GTEST_SKIP() << "no bf16 brgemm: CreateChecksOptionsAndTheCpu covers this CPU";
  std::mt19937_64 rng(17);
  auto attention = MakeShort(64);
  ASSERT_NE(attention, nullptr);
  for (int64_t len : {int64_t{16}, int64_t{23}}) {
    const Fused f = RandomFused(rng, 5, len, 4, 64);
    std::vector<uint16_t> rows16(f.rows.size());
    for (size_t i = 0; i < rows16.size(); ++i) rows16[i] = FloatToBFloat16(f.rows[i]);
    std::vector<float> from_f32, from_bf16;
    const ShortAttention::Args a32 = f.Args(&from_f32);
    ShortAttention::Args a16 = f.Args(&from_bf16);
    const int64_t ld = 3 * f.e();
    a16.q16 = {rows16.data(), ld, len * ld};
    a16.k16 = {rows16.data() + f.e(), ld, len * ld};
    a16.v16 = {rows16.data() + 2 * f.e(), ld, len * ld};
    for (int64_t b = 0; b < f.batch; b += 2) {
      const int64_t nb = std::min<int64_t>(2, f.batch - b);
      ASSERT_TRUE(attention->Run(a32, b, nb, 1, 3, nullptr).ok());
      ASSERT_TRUE(attention->Run(a16, b, nb, 1, 3, nullptr).ok());
    }
    EXPECT_EQ(from_f32, from_bf16) << "len " << len;
    EXPECT_NE(from_f32, std::vector<float>(from_f32.size(), -7.0f));
  }
}

// How many sequences a call takes: powers of two within what is left and within the call's byte bound; the
// memory estimate covers the largest call.
TEST(ShortAttentionTest, SequencesPerCallKeepsItsBounds) {
  if (!OnednnHasBf16Brgemm()) GTEST_SKIP() << "no bf16 brgemm: CreateChecksOptionsAndTheCpu covers this CPU";
  auto attention = MakeShort(64);
  ASSERT_NE(attention, nullptr);
  // One sequence's buffers: bf16 Q, K, V and P, f32 scores and context, lengths padded to 16.
  auto per_sequence = [](int64_t hb, int64_t len) {
    const int64_t lp = (len + 15) / 16 * 16;
    return hb * (2 * (3 * lp * 64 + lp * lp) + 4 * (lp * lp + lp * 64));
  };
  EXPECT_EQ(attention->SequencesPerCall(4, 16, 16, 100), 8);
  EXPECT_EQ(attention->SequencesPerCall(4, 16, 16, 7), 4);
  EXPECT_EQ(attention->SequencesPerCall(4, 16, 16, 1), 1);
  EXPECT_EQ(attention->SequencesPerCall(4, 9, 12, 3), 2) << "lengths pad to 16";
  EXPECT_EQ(attention->SequencesPerCall(8, 64, 64, 8), 1) << "512 KiB a sequence";
  EXPECT_EQ(attention->SequencesPerCall(8, 256, 256, 8), 1);
  for (int64_t hb : {int64_t{1}, int64_t{4}, int64_t{16}}) {
    for (int64_t len = 1; len <= 256; len += 17) {
      const int64_t nb = attention->SequencesPerCall(hb, len, len, 8), bytes = per_sequence(hb, len);
      EXPECT_EQ(nb & (nb - 1), 0) << len;
      EXPECT_TRUE(nb == 1 || nb * bytes <= (int64_t{512} << 10)) << "hb " << hb << " len " << len;
      EXPECT_TRUE(nb == 8 || 2 * nb * bytes > (int64_t{512} << 10)) << "hb " << hb << " len " << len;
      EXPECT_EQ(attention->ScratchBytes(hb, len, len), nb * bytes) << "hb " << hb << " len " << len;
    }
  }
}

TEST(ShortAttentionTest, ShapeCacheKeepsItsBound) {
  if (!OnednnHasBf16Brgemm()) GTEST_SKIP() << "no bf16 brgemm: CreateChecksOptionsAndTheCpu covers this CPU";
  std::mt19937_64 rng(13);
  auto attention = MakeShort(16, /*capacity=*/2);
  ASSERT_NE(attention, nullptr);
  for (int64_t len : {int64_t{3}, int64_t{20}, int64_t{40}, int64_t{3}}) {  // three shapes, then the first again
    ExpectHeadsNearReference(*attention, RandomFused(rng, 1, len, 2, 16), 0, 2, true, false);
    EXPECT_LE(attention->cached_shapes(), 2u);
  }
  ReleaseShortAttentionBuffers(0);  // a worker about to idle; the next request grows them again
  ExpectHeadsNearReference(*attention, RandomFused(rng, 2, 33, 2, 16), 0, 2, true, true);
}

std::unique_ptr<MultiheadAttention> Bf16Layer(const MhaConfig& c, const MhaWeights& w, int64_t short_max_len = 256) {
  MultiheadAttention::Options o;
  o.config = c;
  o.compute = ComputeType::kBFloat16;
  o.short_attention_max_len = short_max_len;
  auto layer = MultiheadAttention::Create(o, w);
  EXPECT_TRUE(layer.ok()) << layer.status();
  return layer.ok() ? std::move(*layer) : nullptr;
}

// A bf16 layer of E=128, 2 heads, and the same layer without ShortAttention.
struct LayerPair {
  MhaConfig c;
  MhaWeights w;
  std::unique_ptr<MultiheadAttention> layer, blocked;
};

LayerPair MakeLayerPair(std::mt19937_64& rng) {
  LayerPair pair{MhaConfig{128, 2, 0, 0, true}, {}, nullptr, nullptr};
  pair.w = testing::RandomTestWeights(pair.c, rng);
  pair.layer = Bf16Layer(pair.c, pair.w);
  pair.blocked = Bf16Layer(pair.c, pair.w, 0);
  return pair;
}

// Through the layer: short requests take it (head groups when the sequences are fewer than the threads), and
// answer as the reference and as the layer without it; long ones and those asking weights do not.
TEST(ShortAttentionTest, LayersSendShortRequestsHere) {
  std::mt19937_64 rng(14);
  const LayerPair pair = MakeLayerPair(rng);
  const auto& [c, w, layer, blocked] = pair;
  ASSERT_TRUE(layer != nullptr && blocked != nullptr);
  const bool on_brgemm = OnednnHasBf16Brgemm() && layer->compute() == ComputeType::kBFloat16;
  EXPECT_EQ(layer->short_attention_on_brgemm(), on_brgemm);
  EXPECT_FALSE(blocked->short_attention_on_brgemm());
  struct Request {
    int64_t batch, len, kv_len;  // kv_len 0: self-attention
    bool need_weights, takes_it;
  };
  for (const Request& r : {Request{1, 45, 0, false, true}, Request{3, 256, 0, false, true},
                           Request{24, 16, 0, false, true}, Request{13, 9, 0, false, true},
                           Request{2, 30, 0, true, false}, Request{1, 257, 0, false, false},
                           Request{2, 20, 37, false, true}}) {
    const std::vector<float> q = RandomValues(rng, r.batch * r.len * c.embed_dim);
    const std::vector<float> kv = RandomValues(rng, r.batch * r.kv_len * c.embed_dim);
    AttentionInputs in;
    in.query = TensorView::F32(q.data(), {r.batch, r.len, c.embed_dim});
    if (r.kv_len > 0) {  // cross-attention, causal over more keys than queries
      in.key = TensorView::F32(kv.data(), {r.batch, r.kv_len, c.embed_dim});
      in.value = in.key;
    }
    in.is_causal = true;
    in.need_weights = r.need_weights;
    // Batches of many sequences (several a call): keys padded differently in each sequence, key 0 always open.
    std::vector<uint8_t> padding(static_cast<size_t>(r.batch * (r.kv_len > 0 ? r.kv_len : r.len)));
    for (size_t j = 0; j < padding.size(); ++j) {
      padding[j] = j % (r.kv_len > 0 ? r.kv_len : r.len) != 0 && rng() % 3 == 0;
    }
    if (r.batch > 8) in.key_padding_mask = TensorView::Bool(padding.data(), {r.batch, r.kv_len > 0 ? r.kv_len : r.len});
    const int64_t runs_before = layer->short_attention_runs();
    for (int threads : {1, 2}) {
      auto got = layer->Forward(in, threads);
      auto without = blocked->Forward(in, threads);
      ASSERT_TRUE(got.ok() && without.ok());
      const testing::NaiveOutputs want = testing::NaiveMultiheadAttention(c, w, in);
      EXPECT_LE(testing::MaxAbsDiff(got->output.values, want.output), 3e-2) << r.len;
      EXPECT_LE(testing::MaxAbsDiff(got->output.values, without->output.values), 3e-2) << r.len;
    }
    EXPECT_EQ(layer->short_attention_runs() > runs_before, on_brgemm && r.takes_it) << r.len;
  }
}

// One batch of a short request, one asking weights and one too long: the group keeps the bf16 mirror and the f32
// context over Q (ShortAttention writing into the fused projection's rows, row stride 3E); each member answers
// as its reference.
TEST(ShortAttentionTest, MixedGroupsAnswerEachMember) {
  std::mt19937_64 rng(15);
  const MhaConfig c{64, 4, 0, 0, true};
  const MhaWeights w = testing::RandomTestWeights(c, rng);
  const std::unique_ptr<MultiheadAttention> layer = Bf16Layer(c, w);
  ASSERT_NE(layer, nullptr);
  const int64_t lens[] = {33, 40, 300};
  std::vector<std::vector<float>> data;
  std::vector<AttentionInputs> inputs(3);
  for (size_t i = 0; i < inputs.size(); ++i) {
    data.push_back(RandomValues(rng, 2 * lens[i] * c.embed_dim));
    inputs[i].query = TensorView::F32(data.back().data(), {2, lens[i], c.embed_dim});
    inputs[i].is_causal = i != 1;
    inputs[i].need_weights = i == 1;
  }
  const std::vector<const AttentionInputs*> ptrs = {&inputs[0], &inputs[1], &inputs[2]};
  for (int threads : {1, 2}) {
    const int64_t runs_before = layer->short_attention_runs();
    auto got = layer->ForwardBatch(ptrs, threads);
    for (size_t i = 0; i < inputs.size(); ++i) {
      ASSERT_TRUE(got[i].ok()) << got[i].status();
      const testing::NaiveOutputs want = testing::NaiveMultiheadAttention(c, w, inputs[i]);
      EXPECT_LE(testing::MaxAbsDiff(got[i]->output.values, want.output), 3e-2) << "member " << i;
    }
    EXPECT_EQ(layer->short_attention_runs() > runs_before, layer->short_attention_on_brgemm());
  }
}

// A self-attention batch of short requests on two threads runs in chunks, each projected, attended and projected
// out by one thread: every member answers as its reference and as the blocked layer (causal, per-sequence key
// padding, lengths that pad), one thread runs it unfused, and a member stopped midway fails alone.
TEST(ShortAttentionTest, FusedChunksAnswerEachMember) {
  std::mt19937_64 rng(18);
  const LayerPair pair = MakeLayerPair(rng);
  const auto& [c, w, layer, blocked] = pair;
  ASSERT_TRUE(layer != nullptr && blocked != nullptr);
  struct Member {
    int64_t batch, len;
    bool causal;
  };
  const Member members[] = {{40, 16, true}, {9, 33, false}, {3, 100, true}};  // 5 + 3 + 3 chunks of <= 128 rows
  std::vector<std::vector<float>> data;
  std::vector<std::vector<uint8_t>> padding;
  std::vector<AttentionInputs> inputs(3);
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Member& m = members[i];
    data.push_back(RandomValues(rng, m.batch * m.len * c.embed_dim));
    padding.emplace_back(static_cast<size_t>(m.batch * m.len));
    for (size_t j = 0; j < padding.back().size(); ++j) padding.back()[j] = j % m.len != 0 && rng() % 4 == 0;
    inputs[i].query = TensorView::F32(data.back().data(), {m.batch, m.len, c.embed_dim});
    inputs[i].key_padding_mask = TensorView::Bool(padding.back().data(), {m.batch, m.len});
    inputs[i].is_causal = m.causal;
  }
  const std::vector<const AttentionInputs*> ptrs = {&inputs[0], &inputs[1], &inputs[2]};
  const bool on_brgemm = layer->short_attention_on_brgemm();
  for (int threads : {2, 1}) {
    const int64_t chunks_before = layer->fused_short_chunks();
    auto got = layer->ForwardBatch(ptrs, threads);
    auto without = blocked->ForwardBatch(ptrs, threads);
    for (size_t i = 0; i < inputs.size(); ++i) {
      ASSERT_TRUE(got[i].ok() && without[i].ok()) << got[i].status() << without[i].status();
      const testing::NaiveOutputs want = testing::NaiveMultiheadAttention(c, w, inputs[i]);
      EXPECT_LE(testing::MaxAbsDiff(got[i]->output.values, want.output), 3e-2) << "member " << i;
      EXPECT_LE(testing::MaxAbsDiff(got[i]->output.values, without[i]->output.values), 3e-2) << "member " << i;
    }
    EXPECT_EQ(layer->fused_short_chunks() - chunks_before, on_brgemm && threads == 2 ? 11 : 0) << threads;
  }
  std::vector<ParsedAttention> parsed;
  for (const AttentionInputs& in : inputs) {
    auto p = layer->Validate(in);
    ASSERT_TRUE(p.ok()) << p.status();
    parsed.push_back(*std::move(p));
  }
  const std::vector<const ParsedAttention*> parsed_ptrs = {&parsed[0], &parsed[1], &parsed[2]};
  // Member 1 stopped after its first check: chunks of it may have finished by then, and must not matter.
  std::atomic<int> member_1_checks{0};
  auto stop_member_1 = [&](size_t i) {
    return i == 1 && member_1_checks.fetch_add(1) >= 1 ? absl::CancelledError("stopped") : absl::OkStatus();
  };
  const int64_t chunks_before = layer->fused_short_chunks();
  auto stopped = layer->ForwardParsed(parsed_ptrs, 2, stop_member_1);
  EXPECT_EQ(layer->fused_short_chunks() - chunks_before, on_brgemm ? 11 : 0);
  EXPECT_TRUE(absl::IsCancelled(stopped[1].status())) << stopped[1].status();
  for (size_t i : {size_t{0}, size_t{2}}) {
    ASSERT_TRUE(stopped[i].ok()) << stopped[i].status();
    const testing::NaiveOutputs want = testing::NaiveMultiheadAttention(c, w, inputs[i]);
    EXPECT_LE(testing::MaxAbsDiff(stopped[i]->output.values, want.output), 3e-2) << "member " << i;
  }
}

// Where oneDNN has no kernel for a shape, its sequences go through the blocked Attend instead (after a call of
// several sequences, again with one, then blocked). With every kernel denied, a self-attention batch in chunks
// (bf16 projections, the context in bf16), the same unfused on one thread, and a cross-attention request (f32
// projections and their bf16 mirror) in the same call answer as the reference and as the blocked layer, and no
// sequence ran ShortAttention.
TEST(ShortAttentionTest, ShapesWithoutAKernelTakeTheBlockedPath) {
  std::mt19937_64 rng(19);
  const LayerPair pair = MakeLayerPair(rng);
  const auto& [c, w, layer, blocked] = pair;
  ASSERT_TRUE(layer != nullptr && blocked != nullptr);
  if (layer->short_attention() == nullptr) GTEST_SKIP() << "no bf16 brgemm: the layer has only the blocked path";
  layer->short_attention()->DenyKernelsForTesting();
  struct Member {
    int64_t batch, len, kv_len;  // kv_len 0: self-attention
    bool causal;
  };
  const Member members[] = {{40, 16, 0, true}, {9, 33, 0, false}, {3, 100, 0, true}, {5, 20, 37, true}};
  std::vector<std::vector<float>> data, kv_data;
  std::vector<std::vector<uint8_t>> padding;
  std::vector<AttentionInputs> inputs(4);
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Member& m = members[i];
    const int64_t keys = m.kv_len > 0 ? m.kv_len : m.len;
    data.push_back(RandomValues(rng, m.batch * m.len * c.embed_dim));
    kv_data.push_back(RandomValues(rng, m.batch * m.kv_len * c.embed_dim));
    padding.emplace_back(static_cast<size_t>(m.batch * keys));
    for (size_t j = 0; j < padding.back().size(); ++j) padding.back()[j] = j % keys != 0 && rng() % 4 == 0;
    inputs[i].query = TensorView::F32(data.back().data(), {m.batch, m.len, c.embed_dim});
    if (m.kv_len > 0) {
      inputs[i].key = TensorView::F32(kv_data.back().data(), {m.batch, m.kv_len, c.embed_dim});
      inputs[i].value = inputs[i].key;
    }
    inputs[i].key_padding_mask = TensorView::Bool(padding.back().data(), {m.batch, keys});
    inputs[i].is_causal = m.causal;
  }
  const std::vector<const AttentionInputs*> ptrs = {&inputs[0], &inputs[1], &inputs[2], &inputs[3]};
  for (int threads : {2, 1}) {
    const int64_t runs_before = layer->short_attention_runs(), chunks_before = layer->fused_short_chunks();
    auto got = layer->ForwardBatch(ptrs, threads);
    auto without = blocked->ForwardBatch(ptrs, threads);
    for (size_t i = 0; i < inputs.size(); ++i) {
      ASSERT_TRUE(got[i].ok() && without[i].ok()) << got[i].status() << without[i].status();
      const testing::NaiveOutputs want = testing::NaiveMultiheadAttention(c, w, inputs[i]);
      EXPECT_LE(testing::MaxAbsDiff(got[i]->output.values, want.output), 3e-2) << "member " << i << ", " << threads;
      EXPECT_LE(testing::MaxAbsDiff(got[i]->output.values, without[i]->output.values), 3e-2) << "member " << i;
    }
    EXPECT_EQ(layer->short_attention_runs(), runs_before) << threads;
    EXPECT_EQ(layer->fused_short_chunks() - chunks_before, threads == 2 ? 11 : 0) << threads;  // chunks still ran
  }
}

}  // namespace
}  // namespace attnserve
