// KServeAnswer and KServeStreamAnswer (server/api/kserve_answer.h): served Open Inference Protocol answers whose
// FP32 outputs go on the wire as raw_output_contents from the tensors the engine wrote, parsed back by protobuf
// as the ModelInferResponse the copying encoder (EncodeModelInferResponse) makes.
#include "server/api/kserve_answer.h"

#include <gtest/gtest.h>

#include <memory>
#include <random>
#include <string>
#include <vector>

#include "server/api/kserve_request.h"
#include "server/api/wire_message.h"
#include "tests/testing/answer_wire.h"

namespace attnserve {
namespace {

using inference::ModelInferRequest;
using inference::ModelInferResponse;
using inference::ModelStreamInferResponse;
using testing::CanonicalBytes;
using testing::SentFrom;

// A finished call (testing::FinishedCall) of a version-3 layer, answered in `dtype`.
std::unique_ptr<InferenceCall> FinishedCall(const Shape& shape, const Shape& weights_shape, DType dtype,
                                            std::mt19937* rng) {
  auto call = testing::FinishedCall(shape, weights_shape, rng);
  auto layer = std::make_shared<ServedLayer>();
  layer->version = 3;
  call->layer = layer;
  call->layer_name = "enc";
  call->output_dtype = dtype;
  return call;
}

ModelInferRequest Asking(const std::vector<std::string>& outputs) {
  ModelInferRequest request;
  for (const std::string& name : outputs) request.add_outputs()->set_name(name);
  return request;
}

struct Case {
  Shape output, weights;
  std::vector<std::string> asked;
};

const std::vector<Case>& Cases() {
  // Sizes around the length varint's steps (128 and 16,384 bytes), unbatched ones, outputs asked in any order.
  static const auto* cases =
      new std::vector<Case>{{{1, 1, 31}, {}, {}},
                            {{1, 1, 32}, {}, {"output"}},
                            {{4095}, {}, {}},
                            {{2, 2048}, {}, {}},
                            {{3, 7, 64}, {3, 7, 9}, {}},
                            {{5, 48}, {5, 11}, {"attn_weights", "output"}},
                            {{2, 32, 512}, {2, 32, 32}, {"attn_weights"}},
                            {{1, 1, 1}, {1, 1, 1}, {"output", "attn_weights"}},
                            {{8, 16, 256}, {8, 4, 16, 16}, {}},
                            {{0, 4, 8}, {0, 4, 4}, {}},  // no values: empty raw_output_contents
                            {{1, 1024, 512}, {1, 8, 1024, 64}, {"attn_weights"}}};  // 2 MiB each: a 4-byte length
  return *cases;
}

TEST(KServeAnswerTest, ParsesAsTheCopiedAnswerWithValuesSentInPlace) {
  std::mt19937 rng(5);
  for (const Case& c : Cases()) {
    auto call = FinishedCall(c.output, c.weights, DType::kFloat32, &rng);
    const ModelInferRequest request = Asking(c.asked);
    ModelInferResponse copied;
    EncodeModelInferResponse(*call, request, &copied);
    KServeAnswer answer;
    EncodeModelInferAnswer(call.get(), request, &answer.message, &answer.raw_outputs);
    ASSERT_EQ(answer.raw_outputs.size(), static_cast<size_t>(copied.outputs_size()));
    EXPECT_EQ(answer.message.raw_output_contents_size(), 0);
    std::vector<const void*> sources;
    for (const Tensor& t : answer.raw_outputs) sources.push_back(t.values.data());
    grpc::ByteBuffer wire;
    ASSERT_TRUE(SerializeWire(answer, &wire).ok());
    for (const void* at : sources) {
      if (at != nullptr) {
        EXPECT_TRUE(SentFrom(wire, at)) << "the values are sent where they are";
      }
    }
    ModelInferResponse parsed;
    ASSERT_TRUE(ParseWire(&wire, &parsed).ok());
    EXPECT_TRUE(CanonicalBytes(parsed) == CanonicalBytes(copied))
        << NumElements(c.output) << " output values, " << c.asked.size() << " outputs asked";
  }
}

TEST(KServeAnswerTest, StreamAnswersCarryTheSameResponse) {
  std::mt19937 rng(7);
  for (const Case& c : Cases()) {
    auto call = FinishedCall(c.output, c.weights, DType::kFloat32, &rng);
    const ModelInferRequest request = Asking(c.asked);
    ModelStreamInferResponse copied;
    EncodeModelInferResponse(*call, request, copied.mutable_infer_response());
    KServeStreamAnswer answer;
    EncodeModelInferAnswer(call.get(), request, answer.message.mutable_infer_response(), &answer.raw_outputs);
    const void* first = answer.raw_outputs.at(0).values.data();
    grpc::ByteBuffer wire;
    ASSERT_TRUE(SerializeWire(answer, &wire).ok());
    if (first != nullptr) {
      EXPECT_TRUE(SentFrom(wire, first));
    }
    ModelStreamInferResponse parsed;
    ASSERT_TRUE(ParseWire(&wire, &parsed).ok());
    EXPECT_TRUE(CanonicalBytes(parsed) == CanonicalBytes(copied));
  }
}

TEST(KServeAnswerTest, SixteenBitOrCopiedAnswersAreTheMessageAlone) {
  std::mt19937 rng(9);
  for (DType dtype : {DType::kBFloat16, DType::kFloat16, DType::kFloat32}) {
    auto call = FinishedCall({2, 5, 40}, {2, 5, 7}, dtype, &rng);
    call->answer_values_in_place = dtype != DType::kFloat32;  // FP32 here: a protocol that copies
    const ModelInferRequest request = Asking({});
    ModelInferResponse copied;
    EncodeModelInferResponse(*call, request, &copied);
    KServeAnswer answer;
    EncodeModelInferAnswer(call.get(), request, &answer.message, &answer.raw_outputs);
    EXPECT_TRUE(answer.raw_outputs.empty());
    ASSERT_EQ(answer.message.raw_output_contents_size(), 2);
    EXPECT_EQ(answer.message.raw_output_contents(0).size(), 2u * 5 * 40 * DTypeSize(dtype));
    grpc::ByteBuffer wire;
    ASSERT_TRUE(SerializeWire(answer, &wire).ok());
    ModelInferResponse parsed;
    ASSERT_TRUE(ParseWire(&wire, &parsed).ok());
    EXPECT_TRUE(CanonicalBytes(parsed) == CanonicalBytes(copied));
  }
  KServeStreamAnswer error;
  error.message.set_error_message("INVALID_ARGUMENT: query: bad");
  error.message.mutable_infer_response()->set_id("e");
  grpc::ByteBuffer wire;
  ASSERT_TRUE(SerializeWire(error, &wire).ok());
  ModelStreamInferResponse parsed;
  ASSERT_TRUE(ParseWire(&wire, &parsed).ok());
  EXPECT_TRUE(CanonicalBytes(parsed) == CanonicalBytes(error.message));
}

TEST(KServeAnswerTest, TheWireOwnsTheValuesAfterTheAnswerIsGone) {
  std::mt19937 rng(17);
  auto call = FinishedCall({4, 16, 128}, {4, 16, 16}, DType::kFloat32, &rng);
  const std::vector<float> output = call->outputs.output.values;
  const std::vector<float> weights = call->outputs.attn_weights.values;
  grpc::ByteBuffer wire;
  {
    KServeAnswer answer;
    EncodeModelInferAnswer(call.get(), Asking({"attn_weights", "output"}), &answer.message, &answer.raw_outputs);
    ASSERT_TRUE(SerializeWire(answer, &wire).ok());
    call.reset();
  }
  grpc::ByteBuffer copy(wire);  // a second reference to the same slices, as gRPC's writer holds
  wire.Clear();
  ModelInferResponse parsed;
  ASSERT_TRUE(ParseWire(&copy, &parsed).ok());
  ASSERT_EQ(parsed.raw_output_contents_size(), 2);
  EXPECT_EQ(parsed.outputs(0).name(), "attn_weights");
  EXPECT_TRUE(parsed.raw_output_contents(0) ==
              std::string(reinterpret_cast<const char*>(weights.data()), weights.size() * sizeof(float)));
  EXPECT_TRUE(parsed.raw_output_contents(1) ==
              std::string(reinterpret_cast<const char*>(output.data()), output.size() * sizeof(float)));
}

}  // namespace
}  // namespace attnserve
