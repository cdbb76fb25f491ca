// attnserve.v1 answers as they are written: an InferResponse or a session's AppendResponse, whose FLOAT32 output
// and attention weights go on the wire straight from the tensors the engine wrote them to (spliced_wire.h).
//
// Thread-safety: none; one thread fills and serializes an answer (the worker that computed it).
#pragma once

#include <grpcpp/grpcpp.h>

#include "attnserve/v1/attention.pb.h"
#include "attnserve/v1/session.pb.h"
#include "core/tensor.h"

namespace attnserve {

// `Message` has Tensor fields output and attn_weights.
template <typename Message>
struct TensorAnswer {
  Message message;
  // When they hold values: the answer's output and attention weights, FLOAT32; message.output and
  // message.attn_weights then hold their shapes and dtype and an empty raw_data, which these values fill on the
  // wire.
  Tensor output;
  Tensor weights;
};

using InferAnswer = TensorAnswer<attnserve::v1::InferResponse>;
using AppendAnswer = TensorAnswer<attnserve::v1::AppendResponse>;

// Serializes `answer` into `wire` (replacing what it held) as the message it stands for: the message's
// bytes with the raw_data of output and attn_weights spliced in, each tensor's values as one slice that owns
// them (moved out of the answer). The bytes parse as the message would with raw_data set, though not in field
// order: the tensors come first. INTERNAL when over protobuf's 2 GiB message limit (which validation's answer
// bound keeps any call from reaching); RESOURCE_EXHAUSTED when out of memory.
grpc::Status SerializeWire(InferAnswer& answer, grpc::ByteBuffer* wire);
grpc::Status SerializeWire(AppendAnswer& answer, grpc::ByteBuffer* wire);

}  // namespace attnserve
