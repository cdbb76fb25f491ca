// Open Inference Protocol answers as they are written: the ModelInferResponse (alone, or inside a
// ModelStreamInferResponse), and its FP32 outputs, whose values go on the wire as raw_output_contents straight
// from the tensors the engine wrote them to (spliced_wire.h).
//
// Thread-safety: none; one thread fills and serializes an answer (the worker that computed it).
#pragma once

#include <grpcpp/grpcpp.h>

#include <vector>

#include "core/tensor.h"
#include "inference/grpc_service.pb.h"

namespace attnserve {

// When raw_outputs holds tensors: one per message.outputs, in order, FP32 (EncodeModelInferAnswer), and
// message.raw_output_contents is empty; they fill it on the wire.
struct KServeAnswer {
  inference::ModelInferResponse message;
  std::vector<Tensor> raw_outputs;
};

// ModelStreamInfer's: raw_outputs are message.infer_response's, as above.
struct KServeStreamAnswer {
  inference::ModelStreamInferResponse message;
  std::vector<Tensor> raw_outputs;
};

// Serializes `answer` into `wire` (replacing what it held) as the message it stands for, the raw_outputs' values
// moved out of the answer into the wire as one slice each. The bytes parse as the message would with
// raw_output_contents set. INTERNAL when over protobuf's 2 GiB message limit (which validation's answer bound
// keeps any call from reaching); RESOURCE_EXHAUSTED when out of memory.
grpc::Status SerializeWire(KServeAnswer& answer, grpc::ByteBuffer* wire);
grpc::Status SerializeWire(KServeStreamAnswer& answer, grpc::ByteBuffer* wire);

}  // namespace attnserve
