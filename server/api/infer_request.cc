#include "server/api/infer_request.h"

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/api/tensor_codec.h"

namespace attnserve {

namespace {

absl::Status DecodeInputs(const attnserve::v1::InferRequest& req, AttentionInputs& in) {
  ATTN_ASSIGN_OR_RETURN(in.query, DecodeTensor(req.query(), "query", AcceptedDTypes::kFloat32));
  ATTN_ASSIGN_OR_RETURN(in.key, DecodeTensor(req.key(), "key", AcceptedDTypes::kFloat32));
  ATTN_ASSIGN_OR_RETURN(in.value, DecodeTensor(req.value(), "value", AcceptedDTypes::kFloat32));
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
  call->decode_status = req.version() < 0
                            ? absl::InvalidArgumentError(absl::StrCat("version: must be >= 0, got ", req.version()))
                            : DecodeInputs(req, call->inputs);
}

absl::Status PrepareInferenceCall(const LayerRegistry& registry, const attnserve::v1::InferRequest& request,
                                  InferenceCall* call) {
  DecodeInferRequest(request, call);
  return ValidateCall(registry, call);
}

void EncodeInferResponse(const InferenceCall& call, attnserve::v1::InferResponse* response) {
  response->set_id(call.id);
  EncodeTensor(call.outputs.output, response->mutable_output());
  if (call.inputs.need_weights) EncodeTensor(call.outputs.attn_weights, response->mutable_attn_weights());
  attnserve::v1::Timing* timing = response->mutable_timing();
  timing->set_queue_us(call.timing.queue_us);
  timing->set_compute_us(call.timing.compute_us);
  timing->set_batch_size(call.timing.batch_size);
}

}  // namespace attnserve
