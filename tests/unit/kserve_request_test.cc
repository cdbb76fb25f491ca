// The Open Inference Protocol's ModelInferRequest decoded into the same InferenceCall as attnserve.v1's
// InferRequest (so both take the same stages and batch together), its errors, and the answer's encoding.
#include "server/api/kserve_request.h"

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/half_float.h"
#include "gtest/gtest.h"
#include "server/api/infer_request.h"
#include "server/api/spliced_wire.h"
#include "server/startup/server_config.h"
#include "tests/testing/naive_mha.h"

namespace attnserve {
namespace {

using inference::ModelInferRequest;

constexpr int kEmbed = 16;

std::unique_ptr<LayerRegistry> TinyRegistry() {
  v1::ServerConfig config;
  v1::LayerConfig* layer = config.add_layers();
  layer->set_name("tiny");
  layer->set_embed_dim(kEmbed);
  layer->set_num_heads(2);
  layer->set_seed(3);
  EXPECT_TRUE(ApplyLayerDefaultsAndValidate(layer).ok());
  auto registry = LayerRegistry::Create(config);
  EXPECT_TRUE(registry.ok()) << registry.status();
  return std::move(*registry);
}

std::string Bytes(const void* data, size_t n) { return std::string(static_cast<const char*>(data), n); }

// An input with raw values appended to the request's raw_input_contents.
void AddRaw(ModelInferRequest* r, const std::string& name, const std::string& datatype, std::vector<int64_t> shape,
            const std::string& raw) {
  auto* in = r->add_inputs();
  in->set_name(name);
  in->set_datatype(datatype);
  for (int64_t d : shape) in->add_shape(d);
  r->add_raw_input_contents(raw);
}

ModelInferRequest QueryRequest(const std::vector<float>& query, int64_t batch, int64_t len) {
  ModelInferRequest r;
  r.set_model_name("tiny");
  r.set_id("r1");
  AddRaw(&r, "query", "FP32", {batch, len, kEmbed}, Bytes(query.data(), query.size() * 4));
  return r;
}

void SetBool(ModelInferRequest* r, const std::string& name, bool value) {
  (*r->mutable_parameters())[name].set_bool_param(value);
}

class KServeRequestTest : public ::testing::Test {
 protected:
  absl::Status Prepare(const ModelInferRequest& r, InferenceCall* call) {
    return PrepareModelInferCall(*registry_, r, call);
  }
  void ExpectError(const ModelInferRequest& r, absl::StatusCode code, const std::string& needle) {
    InferenceCall call;
    const absl::Status s = Prepare(r, &call);
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_NE(s.message().find(needle), std::string::npos) << "wanted '" << needle << "' in: " << s;
  }

  std::unique_ptr<LayerRegistry> registry_ = TinyRegistry();
  std::mt19937_64 rng_{11};
};

TEST_F(KServeRequestTest, DecodesLikeAttnserveV1) {
  const std::vector<float> q = testing::RandomValues(rng_, 2 * 3 * kEmbed);
  ModelInferRequest r = QueryRequest(q, 2, 3);
  SetBool(&r, "is_causal", true);
  SetBool(&r, "need_weights", true);
  SetBool(&r, "average_attn_weights", false);
  InferenceCall call;
  const absl::Status status = Prepare(r, &call);
  ASSERT_TRUE(status.ok()) << status;

  v1::InferRequest same;
  same.set_layer("tiny");
  same.mutable_query()->add_shape(2);
  same.mutable_query()->add_shape(3);
  same.mutable_query()->add_shape(kEmbed);
  same.mutable_query()->set_dtype(v1::FLOAT32);
  same.mutable_query()->set_raw_data(Bytes(q.data(), q.size() * 4));
  same.set_is_causal(true);
  same.set_need_weights(true);
  same.set_average_attn_weights(false);
  InferenceCall v1_call;
  const absl::Status v1_status = PrepareInferenceCall(*registry_, same, &v1_call);
  ASSERT_TRUE(v1_status.ok()) << v1_status;

  EXPECT_EQ(call.layer, v1_call.layer);
  EXPECT_EQ(call.id, "r1");
  EXPECT_EQ(call.inputs.query.shape, v1_call.inputs.query.shape);
  EXPECT_EQ(std::memcmp(call.inputs.query.data, v1_call.inputs.query.data, q.size() * 4), 0);
  EXPECT_EQ(call.inputs.is_causal, v1_call.inputs.is_causal);
  EXPECT_EQ(call.inputs.need_weights, v1_call.inputs.need_weights);
  EXPECT_EQ(call.inputs.average_attn_weights, v1_call.inputs.average_attn_weights);
  EXPECT_EQ(call.parsed.flops, v1_call.parsed.flops);
  EXPECT_EQ(call.parsed.answer_bytes(), v1_call.parsed.answer_bytes());
}

TEST_F(KServeRequestTest, TypedContentsAndBoolMasks) {
  const std::vector<float> q = testing::RandomValues(rng_, 4 * kEmbed);
  ModelInferRequest r;
  r.set_model_name("tiny");
  auto* query = r.add_inputs();
  query->set_name("query");
  query->set_datatype("FP32");
  for (int64_t d : {1, 4, kEmbed}) query->add_shape(d);
  for (float v : q) query->mutable_contents()->add_fp32_contents(v);
  auto* mask = r.add_inputs();
  mask->set_name("key_padding_mask");
  mask->set_datatype("BOOL");
  for (int64_t d : {1, 4}) mask->add_shape(d);
  for (bool b : {false, true, false, true}) mask->mutable_contents()->add_bool_contents(b);
  InferenceCall call;
  ASSERT_TRUE(Prepare(r, &call).ok());
  EXPECT_EQ(std::memcmp(call.inputs.query.data, q.data(), q.size() * 4), 0);
  EXPECT_EQ(call.inputs.key_padding_mask.dtype, DType::kBool);
  EXPECT_EQ(static_cast<const uint8_t*>(call.inputs.key_padding_mask.data)[1], 1);
}

// 16-bit inputs reach the engine as they came (it converts them while gathering its batch) and are answered
// as their exact f32 values would be.
TEST_F(KServeRequestTest, SixteenBitFloatsReachTheEngineAsTheyCame) {
  const std::vector<float> q = testing::RandomValues(rng_, 2 * kEmbed);
  for (const char* type : {"FP16", "BF16"}) {
    const bool fp16 = std::string(type) == "FP16";
    std::vector<uint16_t> bits;
    std::vector<float> widened;
    for (float v : q) {
      bits.push_back(fp16 ? FloatToHalf(v) : FloatToBFloat16(v));
      widened.push_back(fp16 ? HalfToFloat(bits.back()) : BFloat16ToFloat(bits.back()));
    }
    ModelInferRequest r;
    r.set_model_name("tiny");
    AddRaw(&r, "query", type, {1, 2, kEmbed}, Bytes(bits.data(), bits.size() * 2));
    InferenceCall call;
    ASSERT_TRUE(Prepare(r, &call).ok()) << type;
    EXPECT_EQ(call.inputs.query.dtype, fp16 ? DType::kFloat16 : DType::kBFloat16);
    EXPECT_EQ(call.inputs.query.data, r.raw_input_contents(0).data());
    const MultiheadAttention& engine = *call.layer->engine;
    const ParsedAttention* one[] = {&call.parsed};
    auto got = engine.ForwardParsed(one, 1);
    AttentionInputs f32;
    f32.query = TensorView::F32(widened.data(), {1, 2, kEmbed});
    auto want = engine.Forward(f32, 1);
    ASSERT_TRUE(got[0].ok()) << got[0].status();
    ASSERT_TRUE(want.ok()) << want.status();
    EXPECT_EQ(got[0]->output.values, want->output.values) << type;
  }
}

// No f32 copy is made or reserved for a 16-bit input: the engine's gather buffer, which every batched request
// has and the cost counts, holds its converted rows.
TEST_F(KServeRequestTest, SixteenBitInputsCostNoCopyOfTheirOwn) {
  const std::vector<float> q = testing::RandomValues(rng_, 4 * kEmbed);
  std::vector<uint16_t> bits;
  for (float v : q) bits.push_back(FloatToBFloat16(v));
  ModelInferRequest r;
  r.set_model_name("tiny");
  AddRaw(&r, "query", "BF16", {1, 4, kEmbed}, Bytes(bits.data(), bits.size() * 2));
  InferenceCall call;
  call.request_bytes = 1000;
  DecodeModelInferRequest(r, &call);
  ASSERT_TRUE(ValidateCall(*registry_, &call).ok());
  EXPECT_EQ(call.request_bytes, 1000);
  const ModelInferRequest f32_request = QueryRequest(q, 1, 4);
  InferenceCall f32_call;
  f32_call.request_bytes = 1000;
  DecodeModelInferRequest(f32_request, &f32_call);
  ASSERT_TRUE(ValidateCall(*registry_, &f32_call).ok());
  EXPECT_EQ(CallCostBytes(call), CallCostBytes(f32_call));
}

// attnserve.v1 and KServe send FP32 answers from the engine's tensors (infer_answer.h, kserve_answer.h), so both
// reserve the answer once; a 16-bit answer adds its half-size copy, and a protocol that copies (sessions) the whole.
TEST_F(KServeRequestTest, AnswersSentInPlaceAreReservedOnce) {
  const std::vector<float> q = testing::RandomValues(rng_, 2 * 5 * kEmbed);
  ModelInferRequest kserve = QueryRequest(q, 2, 5);
  SetBool(&kserve, "need_weights", true);
  attnserve::v1::InferRequest v1;
  v1.set_layer("tiny");
  v1.set_need_weights(true);
  v1.mutable_query()->set_dtype(attnserve::v1::FLOAT32);
  for (int64_t d : {int64_t{2}, int64_t{5}, int64_t{kEmbed}}) v1.mutable_query()->add_shape(d);
  v1.mutable_query()->set_raw_data(Bytes(q.data(), q.size() * 4));
  InferenceCall kserve_call, v1_call;
  kserve_call.request_bytes = v1_call.request_bytes = 1000;
  ASSERT_TRUE(Prepare(kserve, &kserve_call).ok());
  ASSERT_TRUE(PrepareInferenceCall(*registry_, v1, &v1_call).ok());
  EXPECT_EQ(kserve_call.answer_values_in_place, kHostIsLittleEndian);
  EXPECT_EQ(v1_call.answer_values_in_place, kHostIsLittleEndian);
  const int64_t answer = kserve_call.parsed.answer_bytes();
  EXPECT_EQ(answer, (2 * 5 * kEmbed + 2 * 5 * 5) * 4);
  EXPECT_EQ(CallCostBytes(kserve_call), CallCostBytes(v1_call));
  const int64_t in_place = CallCostBytes(kserve_call);
  kserve_call.output_dtype = DType::kBFloat16;
  EXPECT_EQ(CallCostBytes(kserve_call) - in_place, answer / 2);
  kserve_call.output_dtype = DType::kFloat32;
  kserve_call.answer_values_in_place = false;
  EXPECT_EQ(CallCostBytes(kserve_call) - in_place, answer);
}

TEST_F(KServeRequestTest, RequestedOutputsImplyWeightsAndKeepTheirOrder) {
  const std::vector<float> q = testing::RandomValues(rng_, 3 * kEmbed);
  ModelInferRequest r = QueryRequest(q, 1, 3);
  r.add_outputs()->set_name("attn_weights");
  r.add_outputs()->set_name("output");
  InferenceCall call;
  ASSERT_TRUE(Prepare(r, &call).ok());
  EXPECT_TRUE(call.inputs.need_weights);
  call.outputs.output = Tensor(Shape{1, 3, kEmbed});
  call.outputs.attn_weights = Tensor(Shape{1, 3, 3});
  call.outputs.attn_weights.values[4] = 0.5f;
  call.timing.batch_size = 3;
  inference::ModelInferResponse response;
  EncodeModelInferResponse(call, r, &response);
  ASSERT_EQ(response.outputs_size(), 2);
  EXPECT_EQ(response.outputs(0).name(), "attn_weights");
  EXPECT_EQ(response.outputs(0).datatype(), "FP32");
  EXPECT_EQ(response.outputs(0).shape_size(), 3);
  EXPECT_EQ(response.outputs(1).name(), "output");
  ASSERT_EQ(response.raw_output_contents_size(), 2);
  EXPECT_EQ(response.raw_output_contents(0).size(), 9u * 4);
  EXPECT_EQ(response.raw_output_contents(1).size(), 3u * kEmbed * 4);
  float fifth = 0;
  std::memcpy(&fifth, response.raw_output_contents(0).data() + 16, 4);
  EXPECT_EQ(fifth, 0.5f);
  EXPECT_EQ(response.model_name(), "tiny");
  EXPECT_EQ(response.model_version(), "1");
  EXPECT_EQ(response.id(), "r1");
  EXPECT_EQ(response.parameters().at("batch_size").int64_param(), 3);
}

// parameters.output_dtype BF16 or FP16: every output at half size in that type, named in its datatype.
TEST_F(KServeRequestTest, OutputDTypeAnswersInSixteenBits) {
  const std::vector<float> q = testing::RandomValues(rng_, 2 * kEmbed);
  for (const std::string dtype : {"BF16", "FP16", "FP32"}) {
    ModelInferRequest r = QueryRequest(q, 1, 2);
    (*r.mutable_parameters())["output_dtype"].set_string_param(dtype);
    SetBool(&r, "need_weights", true);
    InferenceCall call;
    ASSERT_TRUE(Prepare(r, &call).ok()) << dtype;
    call.outputs.output = Tensor(Shape{1, 2, kEmbed});
    call.outputs.output.values = testing::RandomValues(rng_, 2 * kEmbed);
    call.outputs.attn_weights = Tensor(Shape{1, 2, 2});
    call.outputs.attn_weights.values = {0.5f, 0.5f, 0.25f, 0.75f};
    inference::ModelInferResponse response;
    EncodeModelInferResponse(call, r, &response);
    ASSERT_EQ(response.outputs_size(), 2);
    const size_t width = dtype == "FP32" ? 4 : 2;
    for (int i = 0; i < 2; ++i) {
      const Tensor& t = i == 0 ? call.outputs.output : call.outputs.attn_weights;
      EXPECT_EQ(response.outputs(i).datatype(), dtype);
      const std::string& raw = response.raw_output_contents(i);
      ASSERT_EQ(raw.size(), t.values.size() * width) << dtype;
      for (size_t j = 0; j < t.values.size(); ++j) {
        uint16_t bits = 0;
        std::memcpy(&bits, raw.data() + j * width, sizeof(bits));
        float got = 0;
        if (dtype == "BF16") got = BFloat16ToFloat(bits);
        if (dtype == "FP16") got = HalfToFloat(bits);
        if (dtype == "FP32") std::memcpy(&got, raw.data() + j * 4, 4);
        EXPECT_NEAR(got, t.values[j], std::abs(t.values[j]) * (dtype == "BF16" ? 4e-3 : 1e-3)) << dtype << " " << j;
      }
    }
  }
  ModelInferRequest r = QueryRequest(q, 1, 2);
  (*r.mutable_parameters())["output_dtype"].set_string_param("INT8");
  ExpectError(r, absl::StatusCode::kInvalidArgument,
              "parameters.output_dtype: expected a string_param FP32, BF16 or FP16, got 'INT8'");
  (*r.mutable_parameters())["output_dtype"].set_bool_param(true);
  ExpectError(r, absl::StatusCode::kInvalidArgument, "parameters.output_dtype: expected a string_param");
}

TEST_F(KServeRequestTest, AllOutputsWhenNoneRequested) {
  const std::vector<float> q = testing::RandomValues(rng_, 2 * kEmbed);
  ModelInferRequest r = QueryRequest(q, 1, 2);
  InferenceCall call;
  ASSERT_TRUE(Prepare(r, &call).ok());
  call.outputs.output = Tensor(Shape{1, 2, kEmbed});
  inference::ModelInferResponse response;
  EncodeModelInferResponse(call, r, &response);
  ASSERT_EQ(response.outputs_size(), 1);  // no attn_weights without need_weights
  EXPECT_EQ(response.outputs(0).name(), "output");
}

TEST_F(KServeRequestTest, ErrorsNameTheField) {
  const std::vector<float> q = testing::RandomValues(rng_, 2 * kEmbed);
  const std::string raw = Bytes(q.data(), q.size() * 4);
  using Code = absl::StatusCode;
  ModelInferRequest r = QueryRequest(q, 1, 2);
  r.mutable_inputs(0)->set_name("qeury");
  ExpectError(r, Code::kInvalidArgument, "inputs[0].name: unknown input 'qeury'");
  r = QueryRequest(q, 1, 2);
  AddRaw(&r, "query", "FP32", {1, 2, kEmbed}, raw);
  ExpectError(r, Code::kInvalidArgument, "inputs[1].name: 'query' given twice");
  r = QueryRequest(q, 1, 2);
  r.mutable_inputs(0)->set_name("key");
  ExpectError(r, Code::kInvalidArgument, "inputs: 'query' is required");
  r = QueryRequest(q, 1, 2);
  r.add_raw_input_contents(raw);
  ExpectError(r, Code::kInvalidArgument, "raw_input_contents: holds 2 entries, expected one per input (1)");
  r = QueryRequest(q, 1, 2);
  r.mutable_inputs(0)->mutable_contents()->add_fp32_contents(1);
  ExpectError(r, Code::kInvalidArgument, "inputs[0].contents: set although raw_input_contents");
  r = QueryRequest(q, 1, 2);
  r.mutable_inputs(0)->set_datatype("INT32");
  ExpectError(r, Code::kInvalidArgument, "query: datatype must be FP32, FP16 or BF16, got 'INT32'");
  r = QueryRequest(q, 1, 2);
  r.mutable_raw_input_contents(0)->pop_back();
  ExpectError(r, Code::kInvalidArgument, "query: raw_input_contents[0] holds 127 bytes, expected 128");
  r = QueryRequest(q, 1, 2);
  (*r.mutable_parameters())["need_weights"].set_int64_param(1);
  ExpectError(r, Code::kInvalidArgument, "parameters.need_weights: expected a bool_param");
  r = QueryRequest(q, 1, 2);
  r.add_outputs()->set_name("logits");
  ExpectError(r, Code::kInvalidArgument, "outputs[0].name: unknown output 'logits'");
  r = QueryRequest(q, 1, 2);
  r.add_outputs()->set_name("output");
  r.add_outputs()->set_name("output");
  ExpectError(r, Code::kInvalidArgument, "outputs[1].name: 'output' given twice");
  r = QueryRequest(q, 1, 2);
  r.add_outputs()->set_name("attn_weights");
  SetBool(&r, "need_weights", false);
  ExpectError(r, Code::kInvalidArgument, "attn_weights requested with parameters.need_weights false");
  r = QueryRequest(q, 1, 2);
  r.set_model_version("x1");
  ExpectError(r, Code::kInvalidArgument, "model_version: expected a positive integer, got 'x1'");
  r = QueryRequest(q, 1, 2);
  r.set_model_version("7");
  ExpectError(r, Code::kNotFound, "model_version: layer 'tiny' has version(s) 1, not 7");
  r = QueryRequest(q, 1, 2);
  r.set_model_name("nope");
  ExpectError(r, Code::kNotFound, "model_name: no layer named 'nope'");
  r.set_model_name("");
  ExpectError(r, Code::kNotFound, "model_name: is required");
  r = QueryRequest(q, 1, 2);
  r.mutable_inputs(0)->set_shape(2, kEmbed / 2);
  r.mutable_inputs(0)->set_shape(1, 4);
  ExpectError(r, Code::kInvalidArgument, "query");
}

TEST_F(KServeRequestTest, SixteenBitValuesMustBeRaw) {
  ModelInferRequest r;
  r.set_model_name("tiny");
  auto* query = r.add_inputs();
  query->set_name("query");
  query->set_datatype("BF16");
  for (int64_t d : {1, 1, kEmbed}) query->add_shape(d);
  for (int i = 0; i < kEmbed; ++i) query->mutable_contents()->add_fp32_contents(0.5f);
  ExpectError(r, absl::StatusCode::kInvalidArgument, "query: BF16 values must come in raw_input_contents");
}

TEST_F(KServeRequestTest, UnknownLayerIsNotFoundWhateverItsTensors) {
  ModelInferRequest r;
  r.set_model_name("nope");
  r.add_inputs()->set_name("garbage");
  ExpectError(r, absl::StatusCode::kNotFound, "model_name: no layer named 'nope'");
}

}  // namespace
}  // namespace attnserve
