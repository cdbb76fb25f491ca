#include "server/api/infer_request.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/api/spliced_wire.h"
#include "server/api/tensor_codec.h"

namespace attnserve {

absl::Status DecodeActivation(const attnserve::v1::Tensor& t, const char* name, TensorView AttentionInputs::*field,
                              InferenceCall* call) {
  ATTN_ASSIGN_OR_RETURN(call->inputs.*field, DecodeTensor(t, name, AcceptedDTypes::kActivation));
  return absl::OkStatus();
}

absl::StatusOr<DType> DecodeOutputDType(v1::DataType dtype) {
  switch (dtype) {
    case v1::DATA_TYPE_UNSPECIFIED:
    case v1::FLOAT32:
      return DType::kFloat32;
    case v1::BFLOAT16:
      return DType::kBFloat16;
    case v1::FLOAT16:
      return DType::kFloat16;
    default:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("output_dtype: must be FLOAT32, BFLOAT16 or FLOAT16, got ", DataTypeName(dtype)));
}

namespace {

absl::Status DecodeInputs(const attnserve::v1::InferRequest& req, InferenceCall* call) {
  AttentionInputs& in = call->inputs;
  ATTN_ASSIGN_OR_RETURN(call->output_dtype, DecodeOutputDType(req.output_dtype()));
  ATTN_RETURN_IF_ERROR(DecodeActivation(req.query(), "query", &AttentionInputs::query, call));
  ATTN_RETURN_IF_ERROR(DecodeActivation(req.key(), "key", &AttentionInputs::key, call));
  ATTN_RETURN_IF_ERROR(DecodeActivation(req.value(), "value", &AttentionInputs::value, call));
  ATTN_ASSIGN_OR_RETURN(in.key_padding_mask,
                        DecodeTensor(req.key_padding_mask(), "key_padding_mask", AcceptedDTypes::kFloat32OrBool));
  ATTN_ASSIGN_OR_RETURN(in.attn_mask, DecodeTensor(req.attn_mask(), "attn_mask", AcceptedDTypes::kFloat32OrBool));
  in.is_causal = req.is_causal();
  in.need_weights = req.need_weights();
  in.average_attn_weights = !req.has_average_attn_weights() || req.average_attn_weights();
  in.position_offset = req.position_offset();
  if (req.position_ids_size() > 0) {
    // Shaped like the query's tokens; the layer checks the count against it.
    Shape tokens = in.query.shape;
    if (!tokens.empty()) tokens.pop_back();
    const int64_t expected = NumElements(tokens);
    if (tokens.empty() || req.position_ids_size() != expected) {
      return absl::InvalidArgumentError(absl::StrCat("position_ids: holds ", req.position_ids_size(),
                                                     " values, expected one per query token (",
                                                     tokens.empty() ? 0 : expected, ")"));
    }
    in.position_ids = TensorView::I64(req.position_ids().data(), std::move(tokens));
  }
  return absl::OkStatus();
}

}  // namespace

void DecodeInferRequest(const attnserve::v1::InferRequest& req, InferenceCall* call) {
  call->layer_name = req.layer();
  call->id = req.id();
  call->version = req.version() > 0 ? req.version() : 0;
  call->answer_values_in_place = kHostIsLittleEndian;  // EncodeInferAnswer
  call->decode_status = req.version() < 0
                            ? absl::InvalidArgumentError(absl::StrCat("version: must be >= 0, got ", req.version()))
                            : DecodeInputs(req, call);
}

absl::Status PrepareInferenceCall(const LayerRegistry& registry, const attnserve::v1::InferRequest& request,
                                  InferenceCall* call) {
  DecodeInferRequest(request, call);
  return ValidateCall(registry, call);
}

namespace {

// Every field of the answer but its tensors.
void EncodeAnswerFields(const InferenceCall& call, attnserve::v1::InferResponse* response) {
  response->set_id(call.id);
  EncodeTiming(call.timing, response->mutable_timing());
}

}  // namespace

void EncodeTiming(const CallTiming& timing, attnserve::v1::Timing* out) {
  out->set_queue_us(timing.queue_us);
  out->set_compute_us(timing.compute_us);
  out->set_batch_size(timing.batch_size);
}

void EncodeInferResponse(const InferenceCall& call, attnserve::v1::InferResponse* response) {
  EncodeAnswerFields(call, response);
  EncodeTensor(call.outputs.output, response->mutable_output(), call.output_dtype);
  if (call.inputs.need_weights) {
    EncodeTensor(call.outputs.attn_weights, response->mutable_attn_weights(), call.output_dtype);
  }
}

namespace {

template <typename Message>
void EncodeTensors(InferenceCall* call, TensorAnswer<Message>* answer) {
  Message& message = answer->message;
  const bool weights = call->inputs.need_weights;
  if (!AnswerSentInPlace(*call)) {
    EncodeTensor(call->outputs.output, message.mutable_output(), call->output_dtype);
    if (weights) EncodeTensor(call->outputs.attn_weights, message.mutable_attn_weights(), call->output_dtype);
    call->outputs = AttentionOutputs();  // held once encoded
    return;
  }
  EncodeTensorHead(call->outputs.output, message.mutable_output(), DType::kFloat32);
  answer->output = std::move(call->outputs.output);
  if (weights) {
    EncodeTensorHead(call->outputs.attn_weights, message.mutable_attn_weights(), DType::kFloat32);
    answer->weights = std::move(call->outputs.attn_weights);
  }
}

}  // namespace

void EncodeAnswerTensors(InferenceCall* call, InferAnswer* answer) { EncodeTensors(call, answer); }

void EncodeAnswerTensors(InferenceCall* call, AppendAnswer* answer) { EncodeTensors(call, answer); }

void EncodeInferAnswer(InferenceCall* call, InferAnswer* answer) {
  EncodeAnswerFields(*call, &answer->message);
  EncodeAnswerTensors(call, answer);
}

}  // namespace attnserve
