// Validation: every bad request is an InvalidArgument that names the field with expected and actual values.
#include <random>

#include "core/attention_inputs.h"
#include "core/multihead_attention.h"
#include "gtest/gtest.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

const MhaConfig kConfig{16, 4, 0, 0, true};
const MhaConfig kCross{16, 4, 6, 10, true};

class AttentionInputsTest : public ::testing::Test {
 protected:
  void ExpectError(const AttentionInputs& in, const std::string& needle, const MhaConfig& c = kConfig,
                   AttentionLimits limits = {}) {
    auto p = ParseAttentionInputs(in, c, limits);
    ASSERT_FALSE(p.ok()) << "expected an error containing: " << needle;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(p.status().message().find(needle), std::string::npos) << p.status();
  }
  std::mt19937_64 rng_{5};
  std::vector<float> f_ = testing::RandomValues(rng_, 4096);
  std::vector<uint8_t> b_ = std::vector<uint8_t>(4096, 1);
};

TEST_F(AttentionInputsTest, AcceptsValidForms) {
  AttentionInputs in;
  in.query = TensorView::F32(f_.data(), {2, 3, 16});
  in.key_padding_mask = TensorView::Bool(b_.data(), {2, 3});
  in.attn_mask = TensorView::F32(f_.data(), {8, 3, 3});
  auto p = ParseAttentionInputs(in, kConfig, {});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->batch, 2);
  EXPECT_EQ(p->q_len, 3);
  EXPECT_TRUE(p->self_attention);
  EXPECT_TRUE(p->attn_mask_per_head);
  EXPECT_EQ(p->key_padding_mask, MaskType::kBool);

  AttentionInputs un;
  un.query = TensorView::F32(f_.data(), {5, 16});
  un.key = TensorView::F32(f_.data(), {7, 6});
  un.value = TensorView::F32(f_.data(), {7, 10});
  un.key_padding_mask = TensorView::F32(f_.data(), {7});
  un.attn_mask = TensorView::Bool(b_.data(), {4, 5, 7});
  p = ParseAttentionInputs(un, kCross, {});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_TRUE(p->unbatched);
  EXPECT_EQ(p->kv_len, 7);
}

TEST_F(AttentionInputsTest, ErrorsNameFieldExpectedAndActual) {
  AttentionInputs in;
  ExpectError(in, "query: is required");
  in.query = TensorView::F32(f_.data(), {2, 3, 15});
  ExpectError(in, "query: expected shape [B, L, 16] or [L, 16] (unbatched), got [2, 3, 15]");
  in.query = TensorView::F32(f_.data(), {2, 3, 1, 16});
  ExpectError(in, "got [2, 3, 1, 16]");
  in.query = TensorView::Bool(b_.data(), {2, 3, 16});
  ExpectError(in, "query: dtype must be FLOAT32, BFLOAT16 or FLOAT16, got BOOL");
  in.query = TensorView::F32(f_.data(), {0, 3, 16});
  ExpectError(in, "query: every dimension must be positive, got shape [0, 3, 16]");
  in.query = TensorView::F32(nullptr, {1, 3, 16});
  ExpectError(in, "query: has a shape but no data");

  in.query = TensorView::F32(f_.data(), {2, 3, 16});
  in.key_padding_mask = TensorView::Bool(b_.data(), {2, 4});
  ExpectError(in, "key_padding_mask: expected shape [2, 3] (B, S), got [2, 4]");
  in.key_padding_mask = {};
  in.attn_mask = TensorView::Bool(b_.data(), {3, 4});
  ExpectError(in, "attn_mask: expected shape [3, 3] (L, S) or [8, 3, 3] (B*H, L, S), got [3, 4]");
  in.attn_mask = TensorView::Bool(b_.data(), {4, 3, 3});
  ExpectError(in, "got [4, 3, 3]");
  in.attn_mask = {};

  in.key = TensorView::F32(f_.data(), {2, 5, 16});
  ExpectError(in, "value: is required when key is given");
  in.value = TensorView::F32(f_.data(), {2, 4, 16});
  ExpectError(in, "value: expected shape [2, 5, 16], got [2, 4, 16]");
  in.key = TensorView::F32(f_.data(), {3, 5, 16});
  ExpectError(in, "key: expected shape [2, S, 16], got [3, 5, 16]");
}

TEST_F(AttentionInputsTest, CrossLayerNeedsKeyAndValue) {
  AttentionInputs in;
  in.query = TensorView::F32(f_.data(), {1, 3, 16});
  ExpectError(in, "key: is required", kCross);
  in.key = TensorView::F32(f_.data(), {1, 4, 16});
  in.value = TensorView::F32(f_.data(), {1, 4, 10});
  ExpectError(in, "key: expected shape [1, S, 6], got [1, 4, 16]", kCross);
}

TEST_F(AttentionInputsTest, Limits) {
  AttentionInputs in;
  in.query = TensorView::F32(f_.data(), {2, 30, 16});
  ExpectError(in, "query length L is 30, past the layer's max_sequence_length of 16", kConfig, {16, 0});
  ExpectError(in, "query tokens B*L is 60, past the layer's max_tokens of 50", kConfig, {0, 50});
}

TEST_F(AttentionInputsTest, BatchLimit) {
  AttentionInputs in;
  in.query = TensorView::F32(f_.data(), {9, 3, 16});
  ExpectError(in, "batch size B is 9, past the layer's max_batch of 8", kConfig, {0, 0, 8, 0});
}

// The answer is sized before anything is computed: the output, and the weights when asked.
TEST_F(AttentionInputsTest, AnswerSizeIsKnownAndBounded) {
  AttentionInputs in;
  in.query = TensorView::F32(f_.data(), {2, 3, 16});
  auto p = ParseAttentionInputs(in, kConfig, {});
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->output_bytes, 2 * 3 * 16 * 4);
  EXPECT_EQ(p->weights_bytes, 0);
  in.need_weights = true;
  p = ParseAttentionInputs(in, kConfig, {});
  EXPECT_EQ(p->weights_bytes, 2 * 3 * 3 * 4);  // averaged [B, L, S]
  in.average_attn_weights = false;
  p = ParseAttentionInputs(in, kConfig, {});
  EXPECT_EQ(p->weights_bytes, 2 * 4 * 3 * 3 * 4);  // per head [B, H, L, S]
  ExpectError(in, "need_weights: the answer would be 672 bytes (output [2, 3, 16] is 384 bytes, attn_weights "
                  "[2, 4, 3, 3] with average_attn_weights=false is 288 bytes), past the layer's "
                  "max_response_bytes of 600", kConfig, {0, 0, 0, 600});
  in.need_weights = false;
  ExpectError(in, "the answer would be 384 bytes (output [2, 3, 16] is 384 bytes), past the layer's "
                  "max_response_bytes of 300", kConfig, {0, 0, 0, 300});
}

// The request that once aborted the server: [8, 4096, 256] with per-head weights is a 2 GiB answer. It is
// refused at validation, and sizing it cannot overflow even for absurd dims.
TEST_F(AttentionInputsTest, TwoGibAnswerIsRefusedUpFront) {
  const MhaConfig small{256, 4, 0, 0, true};
  AttentionInputs in;
  in.query = TensorView::F32(f_.data(), {8, 4096, 256});  // not read: validation only looks at shapes
  in.need_weights = true;
  in.average_attn_weights = false;
  ExpectError(in, "attn_weights [8, 4, 4096, 4096] with average_attn_weights=false is 2147483648 bytes", small,
              {0, 0, 0, int64_t{32} << 20});
  // 2^40 elements is the most a tensor may hold: products of its dims (B*L, the sizes) then fit in int64.
  in.query = TensorView::F32(f_.data(), {int64_t{1} << 16, int64_t{1} << 16, 256});
  auto p = ParseAttentionInputs(in, small, {});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->weights_bytes, int64_t{1} << 52);  // [B, H, L, S] = 2^16 * 4 * 2^16 * 2^16 floats
  in.query = TensorView::F32(f_.data(), {int64_t{1} << 39, int64_t{1} << 39, 256});
  ExpectError(in, "query: shape [549755813888, 549755813888, 256] is too large", small);
}

TEST(MhaConfigTest, Validation) {
  EXPECT_NE(MhaConfig({10, 3}).Validate().message().find("divisible"), std::string::npos);
  EXPECT_FALSE(MhaConfig({0, 1}).Validate().ok());
  EXPECT_FALSE(MhaConfig({8, -1}).Validate().ok());
  EXPECT_FALSE(MhaConfig({8, 2, -3}).Validate().ok());
  EXPECT_TRUE(MhaConfig({8, 2}).Validate().ok());
  MultiheadAttention::Options options;
  options.config = {12, 5};
  auto layer = MultiheadAttention::Create(options, MhaWeights{});
  EXPECT_EQ(layer.status().code(), absl::StatusCode::kInvalidArgument);
  options.config = {12, 4};
  layer = MultiheadAttention::Create(options, MhaWeights{});
  EXPECT_NE(layer.status().message().find("q_proj_weight"), std::string::npos) << layer.status();
}

TEST(AttentionFlopsTest, CountsProjectionsAndAttention) {
  // B=1, L=S=4, E=8: projections 4 * 2*4*8*8 = 2048, attention 2 * 2*4*4*8 = 512.
  EXPECT_EQ(AttentionFlops({8, 2}, 1, 4, 4), 2048 + 512);
}

}  // namespace
}  // namespace attnserve
