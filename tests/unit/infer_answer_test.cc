// InferAnswer (server/api/infer_answer.h): a served answer whose FLOAT32 output and weights go on the wire from
// the tensors the engine wrote, parsed back by protobuf as the InferResponse the copying encoder makes.
#include "server/api/infer_answer.h"

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "server/api/append_answer.h"
#include "server/api/infer_request.h"
#include "server/api/wire_message.h"
#include "tests/testing/answer_wire.h"

namespace attnserve {
namespace {

using testing::FinishedCall;
using testing::SentFrom;

std::string BytesOf(grpc::ByteBuffer* wire) {
  grpc::Slice all;
  EXPECT_TRUE(wire->DumpToSingleSlice(&all).ok());
  return std::string(reinterpret_cast<const char*>(all.begin()), all.size());
}

// What the copying encoder makes of `call`, as bytes in field order.
std::string CopiedAnswer(const InferenceCall& call) {
  attnserve::v1::InferResponse response;
  EncodeInferResponse(call, &response);
  return response.SerializeAsString();
}

// `answer`'s wire bytes, parsed and serialized again in field order, once checked that its tensors' values went
// on the wire from where they lie.
template <typename Message>
std::string ServedBytes(TensorAnswer<Message>& answer) {
  const void* values_at = answer.output.values.data();
  const void* weights_at = answer.weights.values.data();
  grpc::ByteBuffer wire;
  EXPECT_TRUE(SerializeWire(answer, &wire).ok());
  if (values_at != nullptr) {
    EXPECT_TRUE(SentFrom(wire, values_at)) << "the output is sent where it is";
  }
  if (weights_at != nullptr) {
    EXPECT_TRUE(SentFrom(wire, weights_at)) << "the weights are sent where they are";
  }
  Message parsed;
  EXPECT_TRUE(ParseWire(&wire, &parsed).ok());
  return parsed.SerializeAsString();
}

// The served answer's bytes (ServedBytes); `values_at` and `weights_at` receive the addresses its output's and
// weights' values were sent from (null when not sent in place).
std::string SplicedAnswer(InferenceCall* call, const void** values_at, const void** weights_at = nullptr) {
  InferAnswer answer;
  EncodeInferAnswer(call, &answer);
  *values_at = answer.output.values.data();
  if (weights_at != nullptr) *weights_at = answer.weights.values.data();
  return ServedBytes(answer);
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
    const void* weights_at = nullptr;
    const std::string spliced = SplicedAnswer(call.get(), &values_at, &weights_at);
    EXPECT_NE(values_at, nullptr);
    EXPECT_EQ(weights_at != nullptr, !weights.empty());
    EXPECT_EQ(spliced, copied) << "output shape of " << shape.size() << " dims, " << NumElements(shape) << " values";
  }
}

TEST(InferAnswerTest, SixteenBitOutputsAreEncodedIntoTheMessage) {
  std::mt19937 rng(9);
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    auto call = FinishedCall({2, 5, 40}, {2, 5, 7}, &rng);
    call->output_dtype = dtype;
    const std::string copied = CopiedAnswer(*call);
    InferAnswer answer;
    EncodeInferAnswer(call.get(), &answer);
    EXPECT_TRUE(answer.output.values.empty() && answer.weights.values.empty());
    EXPECT_EQ(answer.message.output().raw_data().size(), 2u * 5 * 40 * 2);
    EXPECT_EQ(answer.message.attn_weights().raw_data().size(), 2u * 5 * 7 * 2);
    grpc::ByteBuffer wire;
    ASSERT_TRUE(SerializeWire(answer, &wire).ok());
    EXPECT_EQ(BytesOf(&wire), copied);
  }
}

TEST(InferAnswerTest, AProtocolThatCopiesGetsTheValuesInTheMessage) {
  std::mt19937 rng(11);
  auto call = FinishedCall({2, 6, 24}, {2, 6, 6}, &rng);
  call->answer_values_in_place = false;
  const std::string copied = CopiedAnswer(*call);
  InferAnswer answer;
  EncodeInferAnswer(call.get(), &answer);
  EXPECT_TRUE(answer.output.values.empty() && answer.weights.values.empty());
  EXPECT_EQ(answer.message.SerializeAsString(), copied);
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

// A session's append answer is served the same way, its position and timing beside the tensors.
TEST(InferAnswerTest, AnAppendAnswerParsesAsTheCopiedOne) {
  std::mt19937 rng(23);
  // One decode step, a prompt with averaged weights, per-head weights, a long prompt past the varint steps.
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{1, 64}, {}}, {{5, 48}, {5, 11}}, {{7, 32}, {2, 7, 9}}, {{300, 64}, {300, 300}}};
  for (const auto& [shape, weights] : cases) {
    auto call = FinishedCall(shape, weights, &rng);
    const int64_t position = 1000 + NumElements(shape);
    attnserve::v1::AppendResponse copied;
    EncodeAppendResponse(*call, position, &copied);
    AppendAnswer answer;
    EncodeAppendAnswer(call.get(), position, &answer);
    EXPECT_EQ(answer.output.values.size(), static_cast<size_t>(NumElements(shape)));
    EXPECT_EQ(answer.weights.values.size(), static_cast<size_t>(weights.empty() ? 0 : NumElements(weights)));
    EXPECT_TRUE(call->outputs.output.values.empty()) << "moved, not copied";
    EXPECT_EQ(ServedBytes(answer), copied.SerializeAsString()) << NumElements(shape) << " values";
  }
}

TEST(InferAnswerTest, ASixteenBitOrCopiedAppendAnswerIsTheMessageAloneItsTensorsFreed) {
  std::mt19937 rng(29);
  for (const DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    auto call = FinishedCall({6, 40}, {6, 6}, &rng);
    call->output_dtype = dtype;
    call->answer_values_in_place = dtype != DType::kFloat32;  // f32 here: a protocol that copies
    attnserve::v1::AppendResponse copied;
    EncodeAppendResponse(*call, 6, &copied);
    AppendAnswer answer;
    EncodeAppendAnswer(call.get(), 6, &answer);
    EXPECT_TRUE(answer.output.values.empty() && answer.weights.values.empty());
    EXPECT_TRUE(call->outputs.output.values.empty() && call->outputs.attn_weights.values.empty())
        << "freed once encoded";
    EXPECT_EQ(answer.message.output().raw_data().size(), 6u * 40 * DTypeSize(dtype));
    grpc::ByteBuffer wire;
    ASSERT_TRUE(SerializeWire(answer, &wire).ok());
    EXPECT_EQ(BytesOf(&wire), copied.SerializeAsString());
  }
}

}  // namespace
}  // namespace attnserve
