// An attnserve.v1 answer as it is written: the InferResponse, and its FLOAT32 output and attention weights,
// whose values go on the wire straight from the tensors the engine wrote them to (spliced_wire.h).
//
// Thread-safety: none; one thread fills and serializes an answer (the worker that computed it).
#pragma once

#include <grpcpp/grpcpp.h>

#include "attnserve/v1/attention.pb.h"
#include "core/tensor.h"

namespace attnserve {

struct InferAnswer {
  attnserve::v1::InferResponse message;
  // When they hold values: the answer's output and attention weights, FLOAT32; message.output and
  // message.attn_weights then hold their shapes and dtype and an empty raw_data, which these values fill on the
  // wire.
  Tensor output;
  Tensor weights;
};

// Serializes `answer` into `wire` (replacing what it held) as the InferResponse it stands for: the message's
// bytes with the raw_data of output and attn_weights spliced in, each tensor's values as one slice that owns
// them (moved out of the answer). The bytes parse as the message would with raw_data set, though not in field
// order: the tensors come first. INTERNAL when over protobuf's 2 GiB message limit (which validation's answer
// bound keeps any call from reaching); RESOURCE_EXHAUSTED when out of memory.
grpc::Status SerializeWire(InferAnswer& answer, grpc::ByteBuffer* wire);

}  // namespace attnserve
