// attnserve.v1's InferRequest and InferResponse to and from the protocol-free InferenceCall.
#pragma once

#include "absl/status/status.h"
#include "attnserve/v1/attention.pb.h"
#include "server/api/infer_answer.h"
#include "server/runtime/inference_call.h"
#include "server/runtime/layer_registry.h"

namespace attnserve {

// One activation tensor (query, key or value) into call->inputs.*field, viewed in place whatever its type:
// FLOAT32, or BFLOAT16 / FLOAT16, which the engines convert as they gather a batch (core/activation_rows.h).
// InvalidArgument names `name`.
absl::Status DecodeActivation(const attnserve::v1::Tensor& t, const char* name, TensorView AttentionInputs::*field,
                              InferenceCall* call);

// The answer's element type from a request's output_dtype: FLOAT32 when unset, BFLOAT16 or FLOAT16;
// InvalidArgument naming output_dtype otherwise.
absl::StatusOr<DType> DecodeOutputDType(attnserve::v1::DataType dtype);

// The decode stage: sets call->layer_name, id and inputs (views into `request`, which must outlive the
// call) from the request's fields. A tensor that cannot be decoded sets call->decode_status
// (INVALID_ARGUMENT naming the field), which ValidateCall reports.
void DecodeInferRequest(const attnserve::v1::InferRequest& request, InferenceCall* call);

// Decode, then the validate stage (ValidateCall): what a request goes through before it may be queued.
absl::Status PrepareInferenceCall(const LayerRegistry& registry, const attnserve::v1::InferRequest& request,
                                  InferenceCall* call);

// Where an answered call's time went, as its response reports it.
void EncodeTiming(const CallTiming& timing, attnserve::v1::Timing* out);

// The tensors of a call finished OK as they are served: when AnswerSentInPlace, their shapes and dtype in the
// message and their values moved from call->outputs into the answer, to be sent from there (infer_answer.h);
// otherwise encoded into the message, and call->outputs freed (the budget counts the tensors and one copy:
// AnswerHeldBytes). attn_weights only when asked.
void EncodeAnswerTensors(InferenceCall* call, InferAnswer* answer);
void EncodeAnswerTensors(InferenceCall* call, AppendAnswer* answer);

// The answer of a call finished OK: id, output, attn_weights when asked, timing.
void EncodeInferResponse(const InferenceCall& call, attnserve::v1::InferResponse* response);
// The same as it is served (EncodeAnswerTensors).
void EncodeInferAnswer(InferenceCall* call, InferAnswer* answer);

}  // namespace attnserve
