#include "server/api/append_answer.h"

#include "server/api/infer_request.h"
#include "server/api/tensor_codec.h"

namespace attnserve {
namespace {

// Every field of the answer but its tensors.
void EncodeAppendFields(const InferenceCall& call, int64_t position, attnserve::v1::AppendResponse* response) {
  response->set_id(call.id);
  response->set_position(position);
  EncodeTiming(call.timing, response->mutable_timing());
}

}  // namespace

void EncodeAppendResponse(const InferenceCall& call, int64_t position, attnserve::v1::AppendResponse* response) {
  EncodeAppendFields(call, position, response);
  EncodeTensor(call.outputs.output, response->mutable_output(), call.output_dtype);
  if (call.inputs.need_weights) {
    EncodeTensor(call.outputs.attn_weights, response->mutable_attn_weights(), call.output_dtype);
  }
}

void EncodeAppendAnswer(InferenceCall* call, int64_t position, AppendAnswer* answer) {
  EncodeAppendFields(*call, position, &answer->message);
  EncodeAnswerTensors(call, answer);
}

}  // namespace attnserve
