#include "server/api/kserve_answer.h"

#include <new>
#include <utility>

#include "server/api/spliced_wire.h"
#include "server/api/wire_message.h"

namespace attnserve {
namespace {

constexpr int kRawOutputsField = inference::ModelInferResponse::kRawOutputContentsFieldNumber;
constexpr int kInferResponseField = inference::ModelStreamInferResponse::kInferResponseFieldNumber;

// `response`'s bytes, then each tensor's values as one raw_output_contents (the field's last, so in field order).
grpc::Status SpliceResponse(const inference::ModelInferResponse& response, std::vector<Tensor>* raw_outputs,
                            SplicedWire* wire) {
  if (grpc::Status appended = wire->AppendMessage(response); !appended.ok()) return appended;
  for (Tensor& values : *raw_outputs) wire->AppendValues(kRawOutputsField, std::move(values));
  raw_outputs->clear();
  return grpc::Status::OK;
}

grpc::Status OutOfMemory() {
  return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "out of memory while serializing the answer");
}

}  // namespace

grpc::Status SerializeWire(KServeAnswer& answer, grpc::ByteBuffer* wire) {
  if (answer.raw_outputs.empty()) return SerializeWire(answer.message, wire);
  try {
    SplicedWire whole;
    if (grpc::Status spliced = SpliceResponse(answer.message, &answer.raw_outputs, &whole); !spliced.ok()) {
      return spliced;
    }
    return whole.Finish(answer.message.GetTypeName(), wire);
  } catch (const std::bad_alloc&) {  // on a worker's OpenMP thread, where an escaping exception ends the process
    return OutOfMemory();
  }
}

grpc::Status SerializeWire(KServeStreamAnswer& answer, grpc::ByteBuffer* wire) {
  if (answer.raw_outputs.empty()) return SerializeWire(answer.message, wire);
  try {
    SplicedWire response;
    grpc::Status spliced = SpliceResponse(answer.message.infer_response(), &answer.raw_outputs, &response);
    if (!spliced.ok()) return spliced;
    answer.message.clear_infer_response();
    SplicedWire whole;
    whole.AppendField(kInferResponseField, std::move(response));
    if (grpc::Status rest = whole.AppendMessage(answer.message); !rest.ok()) return rest;
    return whole.Finish(answer.message.GetTypeName(), wire);
  } catch (const std::bad_alloc&) {
    return OutOfMemory();
  }
}

}  // namespace attnserve
