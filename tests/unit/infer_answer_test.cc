// InferAnswer (server/api/infer_answer.h): a served answer whose FLOAT32 output goes on the wire from the tensor
// the engine wrote, parsed back by protobuf as the InferResponse the copying encoder makes.
#include "server/api/infer_answer.h"

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "server/api/infer_request.h"
#include "server/api/wire_message.h"

namespace attnserve {
namespace {

std::string BytesOf(grpc::ByteBuffer* wire) {
  grpc::Slice all;
  EXPECT_TRUE(wire->DumpToSingleSlice(&all).ok());
  return std::string(reinterpret_cast<const char*>(all.begin()), all.size());
}

// A finished call with random outputs of `shape` (and averaged weights of `weights_shape` when not empty).
std::unique_ptr<InferenceCall> FinishedCall(const Shape& shape, const Shape& weights_shape, std::mt19937* rng) {
  auto call = std::make_unique<InferenceCall>();
  call->id = "req-" + std::to_string((*rng)());
  std::normal_distribution<float> normal;
  call->outputs.output = Tensor(shape);
  for (float& v : call->outputs.output.values) v = normal(*rng);
  if (!weights_shape.empty()) {
    call->inputs.need_weights = true;
    call->outputs.attn_weights = Tensor(weights_shape);
    for (float& v : call->outputs.attn_weights.values) v = normal(*rng);
  }
  call->timing = {static_cast<int64_t>((*rng)() % 100000), static_cast<int64_t>((*rng)() % 100000),
                  static_cast<int32_t>(1 + (*rng)() % 64)};
  return call;
}

// What the copying encoder makes of `call`, as bytes in field order.
std::string CopiedAnswer(const InferenceCall& call) {
  attnserve::v1::InferResponse response;
  EncodeInferResponse(call, &response);
  return response.SerializeAsString();
}

// The spliced answer's bytes, parsed and serialized again in field order; `values_at` receives the address its
// output's values were sent from.
std::string SplicedAnswer(InferenceCall* call, const void** values_at) {
  InferAnswer answer;
  EncodeInferAnswer(call, &answer);
  *values_at = answer.output.values.data();
  grpc::ByteBuffer wire;
  EXPECT_TRUE(SerializeWire(answer, &wire).ok());
  EXPECT_TRUE(answer.output.values.empty()) << "moved into the wire's slice";
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(wire.Dump(&slices).ok());
  if (*values_at != nullptr) {
    EXPECT_EQ(slices.size(), 3u);
    EXPECT_TRUE(slices.size() == 3 && slices[1].begin() == *values_at) << "the values are sent where they are";
  }
  attnserve::v1::InferResponse parsed;
  EXPECT_TRUE(ParseWire(&wire, &parsed).ok());
  return parsed.SerializeAsString();
}

TEST(InferAnswerTest, ParsesAsTheCopiedAnswerForEveryShape) {
  std::mt19937 rng(5);
  // Output sizes around the raw_data length's varint steps (128 and 16,384 bytes), unbatched ones, with weights.
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{1, 1, 31}, {}},   {{1, 1, 32}, {}},        {{4095}, {}},
      {{2, 2048}, {}},    {{3, 7, 64}, {3, 7, 9}}, {{5, 48}, {5, 11}},
      {{2, 32, 512}, {}}, {{1, 1, 1}, {1, 1, 1}},  {{8, 16, 256}, {8, 16, 16}}};
  for (const auto& [shape, weights] : cases) {
    auto call = FinishedCall(shape, weights, &rng);
    const std::string copied = CopiedAnswer(*call);
    const void* values_at = nullptr;
    const std::string spliced = SplicedAnswer(call.get(), &values_at);
    EXPECT_NE(values_at, nullptr);
    EXPECT_EQ(spliced, copied) << "output shape of " << shape.size() << " dims, " << NumElements(shape) << " values";
  }
}

TEST(InferAnswerTest, SixteenBitOutputsAreEncodedIntoTheMessage) {
  std::mt19937 rng(9);
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    auto call = FinishedCall({2, 5, 40}, {}, &rng);
    call->output_dtype = dtype;
    const std::string copied = CopiedAnswer(*call);
    InferAnswer answer;
    EncodeInferAnswer(call.get(), &answer);
    EXPECT_TRUE(answer.output.values.empty());
    EXPECT_EQ(answer.message.output().raw_data().size(), 2u * 5 * 40 * 2);
    grpc::ByteBuffer wire;
    ASSERT_TRUE(SerializeWire(answer, &wire).ok());
    EXPECT_EQ(BytesOf(&wire), copied);
  }
}

TEST(InferAnswerTest, AnEmptyOutputAndAnErrorAreTheMessageAlone) {
  std::mt19937 rng(13);
  auto call = FinishedCall({0, 4, 8}, {}, &rng);
  const std::string copied = CopiedAnswer(*call);
  const void* values_at = nullptr;
  EXPECT_EQ(SplicedAnswer(call.get(), &values_at), copied);
  EXPECT_EQ(values_at, nullptr);

  InferAnswer error;
  error.message.set_id("e");
  error.message.mutable_error()->set_code(3);
  error.message.mutable_error()->set_message("query: bad");
  grpc::ByteBuffer wire;
  ASSERT_TRUE(SerializeWire(error, &wire).ok());
  EXPECT_EQ(BytesOf(&wire), error.message.SerializeAsString());
}

TEST(InferAnswerTest, TheWireOwnsTheValuesAfterTheAnswerIsGone) {
  std::mt19937 rng(17);
  auto call = FinishedCall({4, 16, 128}, {}, &rng);
  const std::vector<float> expected = call->outputs.output.values;
  grpc::ByteBuffer wire;
  {
    InferAnswer answer;
    EncodeInferAnswer(call.get(), &answer);
    ASSERT_TRUE(SerializeWire(answer, &wire).ok());
    call.reset();
  }
  grpc::ByteBuffer copy(wire);  // a second reference to the same slices, as gRPC's writer holds
  wire.Clear();
  attnserve::v1::InferResponse parsed;
  ASSERT_TRUE(ParseWire(&copy, &parsed).ok());
  ASSERT_EQ(parsed.output().raw_data().size(), expected.size() * sizeof(float));
  EXPECT_EQ(0, std::memcmp(parsed.output().raw_data().data(), expected.data(), expected.size() * sizeof(float)));
  EXPECT_EQ(parsed.output().shape_size(), 3);
}

}  // namespace
}  // namespace attnserve
