// An attnserve.v1 answer as it is written: the InferResponse, and its FLOAT32 output tensor, whose values go on
// the wire straight from the tensor the engine wrote them to. Copied into the message's raw_data and then into
// gRPC's buffer, a served E=512 answer's two copies took 1.3 % of the server's CPU at concurrency 64, and the
// answer was held twice meanwhile.
//
// Thread-safety: none; one thread fills and serializes an answer (the worker that computed it).
#pragma once

#include <grpcpp/grpcpp.h>

#include "attnserve/v1/attention.pb.h"
#include "core/tensor.h"

namespace attnserve {

struct InferAnswer {
  attnserve::v1::InferResponse message;
  // When it holds values: the answer's output values, FLOAT32; message.output then holds the tensor's shape and
  // dtype and an empty raw_data, which these values fill on the wire.
  Tensor output;
};

// Serializes `answer` into `wire` (replacing what it held) as the InferResponse it stands for: the message's
// bytes with output.raw_data spliced in, `answer->output`'s values as one slice that owns them (moved out of
// the answer, freed when gRPC is done with the bytes). The bytes parse as the message would with raw_data set,
// though not in field order: the output comes first. INTERNAL when over protobuf's 2 GiB message limit (which
// validation's answer bound keeps any call from reaching).
grpc::Status SerializeWire(InferAnswer& answer, grpc::ByteBuffer* wire);

}  // namespace attnserve
