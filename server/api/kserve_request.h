// The Open Inference Protocol's ModelInferRequest and ModelInferResponse (package inference) to and from the
// protocol-free InferenceCall, so that KServe requests go through the same validate, admit, batch and engine
// stages as attnserve.v1's, and batch with them.
//
// Inputs by name: query, key, value (FP32, or FP16 / BF16 handed to the engine as they are), key_padding_mask
// and attn_mask (FP32 or BOOL), with values either all in raw_input_contents (in the order of `inputs`) or each
// in its `contents` (fp32_contents, bool_contents). Parameters is_causal, need_weights, average_attn_weights
// (bool_param). Outputs `output` and `attn_weights`; requesting attn_weights implies need_weights.
#pragma once

#include <vector>

#include "absl/status/status.h"
#include "inference/grpc_service.pb.h"
#include "server/runtime/inference_call.h"
#include "server/runtime/layer_registry.h"

namespace attnserve {

// The decode stage: sets call->layer_name, id, version and inputs (views into `request`, which must outlive
// the call). FP16 and BF16 inputs are views of dtype kFloat16 / kBFloat16: the engine converts them as it
// gathers its batch (no copy of their own). What cannot be decoded sets call->decode_status
// (INVALID_ARGUMENT naming the field, e.g. "query: raw_input_contents[0] holds 6 bytes, expected 8 (shape
// [1, 2] x FP32)").
void DecodeModelInferRequest(const inference::ModelInferRequest& request, InferenceCall* call);

// Decode, then the validate stage (ValidateCall), then the conversions admission would run: a call ready for
// the engine (for tests and the fuzz harness).
absl::Status PrepareModelInferCall(const LayerRegistry& registry, const inference::ModelInferRequest& request,
                                   InferenceCall* call);

// The answer of a call finished OK: model name and version, id, the outputs `request` asked for (all when
// it names none) in raw_output_contents, in the call's output_dtype (FP32, BF16 or FP16), and queue_us,
// compute_us, batch_size parameters.
void EncodeModelInferResponse(const InferenceCall& call, const inference::ModelInferRequest& request,
                              inference::ModelInferResponse* response);

// The same as it is served: when AnswerSentInPlace, the outputs' values are moved from call->outputs into
// `raw_outputs` (in the order of response->outputs), to be sent from there as raw_output_contents
// (kserve_answer.h); otherwise they are encoded into the message as EncodeModelInferResponse does.
void EncodeModelInferAnswer(InferenceCall* call, const inference::ModelInferRequest& request,
                            inference::ModelInferResponse* response, std::vector<Tensor>* raw_outputs);

}  // namespace attnserve
