#include "server/api/infer_answer.h"

#include <new>
#include <utility>

#include "server/api/spliced_wire.h"
#include "server/api/wire_message.h"

namespace attnserve {
namespace {

constexpr int kRawDataField = attnserve::v1::Tensor::kRawDataFieldNumber;

// Appends field `field` of the response: the tensor message `head` (shape, dtype) with `values` as its raw_data.
grpc::Status SpliceTensor(int field, const attnserve::v1::Tensor& head, Tensor values, SplicedWire* wire) {
  SplicedWire tensor;
  if (grpc::Status appended = tensor.AppendMessage(head); !appended.ok()) return appended;
  tensor.AppendValues(kRawDataField, std::move(values));
  wire->AppendField(field, std::move(tensor));
  return grpc::Status::OK;
}

// SerializeWire of an answer with values: output and attn_weights with their values, then the rest of the
// message (id, timing) serialized straight into gRPC's slices.
template <typename Message>
grpc::Status SpliceAnswer(TensorAnswer<Message>& answer, grpc::ByteBuffer* wire) {
  constexpr int kOutputField = Message::kOutputFieldNumber;
  constexpr int kWeightsField = Message::kAttnWeightsFieldNumber;
  Message& message = answer.message;
  SplicedWire whole;
  if (!answer.output.values.empty()) {
    message.mutable_output()->clear_raw_data();
    grpc::Status spliced = SpliceTensor(kOutputField, message.output(), std::move(answer.output), &whole);
    if (!spliced.ok()) return spliced;
    message.clear_output();
  }
  if (!answer.weights.values.empty()) {
    message.mutable_attn_weights()->clear_raw_data();
    grpc::Status spliced = SpliceTensor(kWeightsField, message.attn_weights(), std::move(answer.weights), &whole);
    if (!spliced.ok()) return spliced;
    message.clear_attn_weights();
  }
  if (grpc::Status rest = whole.AppendMessage(message); !rest.ok()) return rest;
  return whole.Finish(message.GetTypeName(), wire);
}

template <typename Message>
grpc::Status SerializeAnswer(TensorAnswer<Message>& answer, grpc::ByteBuffer* wire) {
  if (answer.output.values.empty() && answer.weights.values.empty()) return SerializeWire(answer.message, wire);
  try {
    return SpliceAnswer(answer, wire);
  } catch (const std::bad_alloc&) {  // on a worker's OpenMP thread, where an escaping exception ends the process
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "out of memory while serializing the answer");
  }
}

}  // namespace

grpc::Status SerializeWire(InferAnswer& answer, grpc::ByteBuffer* wire) { return SerializeAnswer(answer, wire); }

grpc::Status SerializeWire(AppendAnswer& answer, grpc::ByteBuffer* wire) { return SerializeAnswer(answer, wire); }

}  // namespace attnserve
