// The API's Tensor message to engine views and back, and the validate stage's errors.
#include <cstring>
#include <random>

#include "common/half_float.h"
#include "gtest/gtest.h"
#include "server/api/infer_request.h"
#include "server/api/tensor_codec.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

using attnserve::v1::Tensor;

Tensor RawF32(const std::vector<float>& values, std::vector<int64_t> shape) {
  Tensor t;
  for (int64_t d : shape) t.add_shape(d);
  t.set_dtype(v1::FLOAT32);
  t.set_raw_data(std::string(reinterpret_cast<const char*>(values.data()), values.size() * 4));
  return t;
}

void ExpectError(const Tensor& t, AcceptedDTypes accepted, const std::string& needle) {
  auto v = DecodeTensor(t, "query", accepted);
  ASSERT_FALSE(v.ok()) << needle;
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(v.status().message().find(needle), std::string::npos) << v.status();
}

TEST(TensorCodecTest, DecodesEachEncoding) {
  std::mt19937_64 rng(1);
  const std::vector<float> values = testing::RandomValues(rng, 6);
  const Tensor raw_msg = RawF32(values, {2, 3});  // the view points into the message
  auto raw = DecodeTensor(raw_msg, "query", AcceptedDTypes::kFloat32);
  ASSERT_TRUE(raw.ok()) << raw.status();
  EXPECT_EQ(raw->shape, (Shape{2, 3}));
  EXPECT_EQ(std::memcmp(raw->data, values.data(), 24), 0);

  Tensor floats;
  floats.add_shape(6);
  for (float v : values) floats.add_float_data(v);  // dtype left unspecified
  auto f = DecodeTensor(floats, "query", AcceptedDTypes::kFloat32);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->dtype, DType::kFloat32);
  EXPECT_EQ(std::memcmp(f->data, values.data(), 24), 0);

  Tensor bools;
  bools.add_shape(3);
  for (bool b : {true, false, true}) bools.add_bool_data(b);
  auto b = DecodeTensor(bools, "key_padding_mask", AcceptedDTypes::kFloat32OrBool);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->dtype, DType::kBool);
  EXPECT_EQ(static_cast<const uint8_t*>(b->data)[0], 1);
  EXPECT_EQ(static_cast<const uint8_t*>(b->data)[1], 0);

  auto absent = DecodeTensor(Tensor(), "key", AcceptedDTypes::kFloat32);
  ASSERT_TRUE(absent.ok());
  EXPECT_FALSE(absent->present());
}

TEST(TensorCodecTest, ErrorsNameFieldExpectedAndActual) {
  std::mt19937_64 rng(2);
  const std::vector<float> values = testing::RandomValues(rng, 6);
  Tensor t = RawF32(values, {2, 4});
  ExpectError(t, AcceptedDTypes::kFloat32, "query: raw_data holds 24 bytes, expected 32 (shape [2, 4] x FLOAT32)");
  t = RawF32(values, {2, 3});
  t.add_float_data(1.0f);
  ExpectError(t, AcceptedDTypes::kFloat32, "exactly one of raw_data, float_data, bool_data");
  t = RawF32(values, {2, 3});
  t.set_dtype(v1::BOOL);
  ExpectError(t, AcceptedDTypes::kFloat32, "query: dtype must be FLOAT32, got BOOL");
  t = RawF32(values, {2, 3});
  t.set_dtype(v1::DATA_TYPE_UNSPECIFIED);
  ExpectError(t, AcceptedDTypes::kFloat32, "dtype must be FLOAT32, got DATA_TYPE_UNSPECIFIED");
  t = RawF32(values, {2, -3});
  ExpectError(t, AcceptedDTypes::kFloat32, "every dimension must be positive, got shape [2, -3]");
  t = RawF32(values, {1ll << 30, 1ll << 30});
  ExpectError(t, AcceptedDTypes::kFloat32, "is too large");
  Tensor floats;
  floats.add_shape(4);
  floats.add_float_data(1.0f);
  ExpectError(floats, AcceptedDTypes::kFloat32, "float_data holds 1 values, expected 4 (shape [4])");
  Tensor no_shape;
  no_shape.add_float_data(1.0f);
  ExpectError(no_shape, AcceptedDTypes::kFloat32, "has values but no shape");
  Tensor mixed;
  mixed.add_shape(1);
  mixed.set_dtype(v1::FLOAT32);
  mixed.add_bool_data(true);
  ExpectError(mixed, AcceptedDTypes::kFloat32OrBool, "dtype is FLOAT32 but values are in bool_data");
}

TEST(TensorCodecTest, EncodeRoundTrips) {
  std::mt19937_64 rng(3);
  attnserve::Tensor out({2, 2}, testing::RandomValues(rng, 4));
  Tensor msg;
  EncodeTensor(out, &msg);
  auto back = DecodeTensor(msg, "output", AcceptedDTypes::kFloat32);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->shape, out.shape);
  EXPECT_EQ(std::memcmp(back->data, out.values.data(), 16), 0);
}

// 16-bit bit patterns of `values`, little-endian, as a raw_data tensor of `dtype`.
Tensor Raw16(const std::vector<float>& values, std::vector<int64_t> shape, v1::DataType dtype) {
  Tensor t;
  for (int64_t d : shape) t.add_shape(d);
  t.set_dtype(dtype);
  std::string raw;
  for (float v : values) {
    const uint16_t bits = dtype == v1::BFLOAT16 ? FloatToBFloat16(v) : FloatToHalf(v);
    raw.push_back(static_cast<char>(bits & 0xFF));
    raw.push_back(static_cast<char>(bits >> 8));
  }
  t.set_raw_data(raw);
  return t;
}

TEST(TensorCodecTest, SixteenBitActivationsOnlyInRawDataAndOnlyWhereAccepted) {
  std::mt19937_64 rng(5);
  const std::vector<float> values = testing::RandomValues(rng, 6);
  for (v1::DataType dtype : {v1::BFLOAT16, v1::FLOAT16}) {
    const Tensor msg = Raw16(values, {2, 3}, dtype);
    auto view = DecodeTensor(msg, "query", AcceptedDTypes::kActivation);
    ASSERT_TRUE(view.ok()) << view.status();
    EXPECT_EQ(view->dtype, dtype == v1::BFLOAT16 ? DType::kBFloat16 : DType::kFloat16);
    EXPECT_EQ(view->num_bytes(), 12u);
    ExpectError(msg, AcceptedDTypes::kFloat32, "query: dtype must be FLOAT32, got " + v1::DataType_Name(dtype));
    ExpectError(msg, AcceptedDTypes::kFloat32OrBool, "dtype must be FLOAT32 or BOOL, got " + v1::DataType_Name(dtype));
    Tensor short_msg = msg;
    short_msg.mutable_raw_data()->pop_back();
    ExpectError(short_msg, AcceptedDTypes::kActivation,
                "query: raw_data holds 11 bytes, expected 12 (shape [2, 3] x " + v1::DataType_Name(dtype) + ")");
    Tensor typed;
    typed.add_shape(1);
    typed.set_dtype(dtype);
    typed.add_float_data(1.0f);
    ExpectError(typed, AcceptedDTypes::kActivation, "values are in float_data (16-bit values come in raw_data)");
  }
}

TEST(TensorCodecTest, EncodesBf16AndF16RoundedToNearestEven) {
  std::mt19937_64 rng(6);
  attnserve::Tensor out({3, 37}, testing::RandomValues(rng, 3 * 37));
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    Tensor msg;
    EncodeTensor(out, &msg, dtype);
    EXPECT_EQ(msg.dtype(), dtype == DType::kBFloat16 ? v1::BFLOAT16 : v1::FLOAT16);
    EXPECT_EQ(std::vector<int64_t>(msg.shape().begin(), msg.shape().end()), out.shape);
    ASSERT_EQ(msg.raw_data().size(), out.values.size() * 2);
    for (size_t i = 0; i < out.values.size(); ++i) {
      uint16_t bits;
      std::memcpy(&bits, msg.raw_data().data() + 2 * i, 2);
      EXPECT_EQ(bits, dtype == DType::kBFloat16 ? FloatToBFloat16(out.values[i]) : FloatToHalf(out.values[i])) << i;
    }
  }
}

TEST(PrepareInferenceCallTest, SixteenBitInputsReachTheEngineAndOutputDtype) {
  v1::ServerConfig config;
  auto* layer = config.add_layers();
  layer->set_name("tiny");
  layer->set_embed_dim(8);
  layer->set_num_heads(2);
  auto registry = LayerRegistry::Create(config);
  ASSERT_TRUE(registry.ok()) << registry.status();
  std::mt19937_64 rng(7);
  const std::vector<float> x = testing::RandomValues(rng, 2 * 3 * 8);
  for (v1::DataType dtype : {v1::BFLOAT16, v1::FLOAT16}) {
    v1::InferRequest req;
    req.set_layer("tiny");
    *req.mutable_query() = Raw16(x, {2, 3, 8}, dtype);
    req.set_output_dtype(dtype);
    InferenceCall call;
    call.request_bytes = 100;
    ASSERT_TRUE(PrepareInferenceCall(**registry, req, &call).ok());
    EXPECT_EQ(call.request_bytes, 100) << "no f32 copy: the engine converts while it gathers";
    EXPECT_EQ(call.inputs.query.dtype, dtype == v1::BFLOAT16 ? DType::kBFloat16 : DType::kFloat16);
    EXPECT_EQ(call.inputs.query.data, req.query().raw_data().data()) << "viewed in the message";
    std::vector<float> widened;
    for (float v : x) {
      widened.push_back(dtype == v1::BFLOAT16 ? BFloat16ToFloat(FloatToBFloat16(v)) : HalfToFloat(FloatToHalf(v)));
    }
    AttentionInputs f32;
    f32.query = TensorView::F32(widened.data(), {2, 3, 8});
    auto out = call.layer->engine->Forward(call.inputs);
    ASSERT_TRUE(out.ok()) << out.status();
    auto want = call.layer->engine->Forward(f32);
    ASSERT_TRUE(want.ok()) << want.status();
    EXPECT_EQ(out->output.values, want->output.values);
    call.outputs = std::move(*out);
    v1::InferResponse resp;
    EncodeInferResponse(call, &resp);
    EXPECT_EQ(resp.output().dtype(), dtype);
    EXPECT_EQ(resp.output().raw_data().size(), 48u * 2);
  }
  v1::InferRequest bad;
  bad.set_layer("tiny");
  *bad.mutable_query() = RawF32(x, {2, 3, 8});
  bad.set_output_dtype(v1::BOOL);
  InferenceCall call;
  const absl::Status s = PrepareInferenceCall(**registry, bad, &call);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "output_dtype: must be FLOAT32, BFLOAT16 or FLOAT16, got BOOL");
}

TEST(PrepareInferenceCallTest, LayerAndFieldErrors) {
  v1::ServerConfig config;
  auto* layer = config.add_layers();
  layer->set_name("tiny");
  layer->set_embed_dim(8);
  layer->set_num_heads(2);
  layer->set_max_sequence_length(16);
  auto registry = LayerRegistry::Create(config);
  ASSERT_TRUE(registry.ok()) << registry.status();

  std::mt19937_64 rng(4);
  v1::InferRequest req;
  InferenceCall call;
  req.set_layer("nope");
  // An unknown layer is NOT_FOUND whatever its tensors (a bad one here).
  req.mutable_query()->add_shape(3);
  EXPECT_EQ(PrepareInferenceCall(**registry, req, &call).code(), absl::StatusCode::kNotFound);

  req.set_layer("tiny");
  *req.mutable_query() = RawF32(testing::RandomValues(rng, 2 * 3 * 8), {2, 3, 8});
  ASSERT_TRUE(PrepareInferenceCall(**registry, req, &call).ok());
  EXPECT_EQ(call.parsed.query_tokens(), 6);
  EXPECT_EQ(call.parsed.flops, AttentionFlops(call.layer->engine->config(), 2, 3, 3));
  EXPECT_EQ(call.layer->version, 1);
  EXPECT_TRUE(call.inputs.average_attn_weights);

  *req.mutable_key_padding_mask() = RawF32(testing::RandomValues(rng, 2 * 4), {2, 4});
  absl::Status s = PrepareInferenceCall(**registry, req, &call);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("key_padding_mask: expected shape [2, 3] (B, S), got [2, 4]"), std::string::npos) << s;

  req.clear_key_padding_mask();
  *req.mutable_query() = RawF32(testing::RandomValues(rng, 20 * 8), {20, 8});
  s = PrepareInferenceCall(**registry, req, &call);
  EXPECT_NE(s.message().find("max_sequence_length of 16"), std::string::npos) << s;
}

}  // namespace
}  // namespace attnserve
