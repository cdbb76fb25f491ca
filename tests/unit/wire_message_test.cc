// ParseWire and SerializeWire (server/api/wire_message.h): what the raw methods parse and answer with.
#include "server/api/wire_message.h"

#include <random>
#include <string>

#include <gtest/gtest.h>

#include "attnserve/v1/attention.pb.h"
#include "attnserve/v1/session.pb.h"
#include "inference/grpc_service.pb.h"

namespace attnserve {
namespace {

grpc::ByteBuffer BytesOf(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

// A request with random values in every kind of field the codec reads, split over several slices on the wire.
attnserve::v1::InferRequest RandomRequest(std::mt19937* rng) {
  attnserve::v1::InferRequest request;
  request.set_layer("layer-" + std::to_string((*rng)() % 1000));
  request.set_id(std::to_string((*rng)()));
  request.set_need_weights(true);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  std::string raw(4 * 3 * 5000, '\0');
  for (size_t i = 0; i < raw.size(); i += 4) {
    const float value = uniform(*rng);
    raw.replace(i, 4, reinterpret_cast<const char*>(&value), 4);
  }
  request.mutable_query()->add_shape(3);
  request.mutable_query()->add_shape(5000);
  request.mutable_query()->set_raw_data(raw);
  return request;
}

TEST(WireMessageTest, ParsesARequestSplitOverSlicesAndEmptiesTheWire) {
  std::mt19937 rng(7);
  const attnserve::v1::InferRequest sent = RandomRequest(&rng);
  const std::string bytes = sent.SerializeAsString();
  // Three slices cut at random points, as frames arrive.
  size_t a = 1 + rng() % (bytes.size() / 2), b = a + 1 + rng() % (bytes.size() / 2 - 1);
  grpc::Slice slices[3] = {grpc::Slice(bytes.substr(0, a)), grpc::Slice(bytes.substr(a, b - a)),
                           grpc::Slice(bytes.substr(b))};
  grpc::ByteBuffer wire(slices, 3);
  attnserve::v1::InferRequest parsed;
  ASSERT_TRUE(ParseWire(&wire, &parsed).ok());
  EXPECT_EQ(parsed.SerializeAsString(), bytes);
  EXPECT_FALSE(wire.Valid());  // its bytes are not held twice
}

TEST(WireMessageTest, SerializesWhatParsesBack) {
  std::mt19937 rng(11);
  const attnserve::v1::InferRequest sent = RandomRequest(&rng);
  grpc::ByteBuffer wire;
  ASSERT_TRUE(SerializeWire(sent, &wire).ok());
  EXPECT_EQ(wire.Length(), sent.ByteSizeLong());
  attnserve::v1::InferRequest parsed;
  ASSERT_TRUE(ParseWire(&wire, &parsed).ok());
  EXPECT_EQ(parsed.SerializeAsString(), sent.SerializeAsString());
}

TEST(WireMessageTest, BytesThatAreNotTheMessageAreInvalidArgumentNamingItAndTheirSize) {
  for (const std::string& bytes : {std::string(5, '\xff'), std::string("\x0a\xff\xff\x03" "abc", 7),
                                   std::string("\x0d\x01", 2)}) {
    grpc::ByteBuffer wire = BytesOf(bytes);
    inference::ModelInferRequest parsed;
    const grpc::Status status = ParseWire(&wire, &parsed);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(status.error_message(), "request: expected an inference.ModelInferRequest message, got " +
                                          std::to_string(bytes.size()) + " bytes that do not parse as one");
    EXPECT_FALSE(wire.Valid());
  }
}

TEST(WireMessageTest, NoMessageAtAllIsInvalidArgument) {
  grpc::ByteBuffer wire;  // what gRPC hands a unary handler whose call closed without a message
  attnserve::v1::AppendRequest parsed;
  const grpc::Status status = ParseWire(&wire, &parsed);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(status.error_message(), "request: expected one attnserve.v1.AppendRequest message, got none");
}

TEST(WireMessageTest, AnEmptyMessageParses) {
  grpc::ByteBuffer wire = BytesOf("");
  attnserve::v1::InferRequest parsed;
  EXPECT_TRUE(ParseWire(&wire, &parsed).ok());
  EXPECT_EQ(parsed.ByteSizeLong(), 0u);
}

}  // namespace
}  // namespace attnserve
