// Helpers of the tests of answers as they are served (infer_answer.h, kserve_answer.h): a finished call with random
// outputs, messages compared byte for byte whatever their maps' order, and whether values went on the wire from
// where they lie.
#pragma once

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <google/protobuf/message_lite.h>
#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "server/runtime/inference_call.h"

namespace attnserve::testing {

// A finished call with normal random outputs of `shape` (and weights of `weights_shape` when not empty, as
// need_weights makes them), random timing, of a protocol that sends values in place (as both decode stages mark a
// call on a little-endian host).
inline std::unique_ptr<InferenceCall> FinishedCall(const Shape& shape, const Shape& weights_shape, std::mt19937* rng) {
  auto call = std::make_unique<InferenceCall>();
  call->answer_values_in_place = true;
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

// `message`'s bytes with map entries in key order, so that equal messages give equal bytes.
inline std::string CanonicalBytes(const google::protobuf::MessageLite& message) {
  std::string bytes;
  google::protobuf::io::StringOutputStream stream(&bytes);
  google::protobuf::io::CodedOutputStream out(&stream);
  out.SetSerializationDeterministic(true);
  message.SerializeToCodedStream(&out);
  return bytes;
}

// Whether one of `wire`'s slices starts at `at`: values sent from where they lie.
inline bool SentFrom(const grpc::ByteBuffer& wire, const void* at) {
  std::vector<grpc::Slice> slices;
  if (!wire.Dump(&slices).ok()) return false;
  for (const grpc::Slice& slice : slices) {
    if (slice.begin() == at) return true;
  }
  return false;
}

}  // namespace attnserve::testing
