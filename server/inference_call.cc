#include "server/inference_call.h"

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "server/tensor_codec.h"

namespace attnserve {

absl::Status PrepareInferenceCall(const LayerRegistry& registry, InferenceCall* call) {
  const attnserve::v1::InferRequest& req = *call->request;
  call->layer = registry.Find(req.layer());
  if (call->layer == nullptr) {
    return absl::NotFoundError(req.layer().empty() ? std::string("layer: is required")
                                                   : absl::StrCat("layer: no layer named '", req.layer(), "'"));
  }
  AttentionInputs& in = call->inputs;
  ASSIGN_OR_RETURN(in.query, DecodeTensor(req.query(), "query", AcceptedDTypes::kFloat32));
  ASSIGN_OR_RETURN(in.key, DecodeTensor(req.key(), "key", AcceptedDTypes::kFloat32));
  ASSIGN_OR_RETURN(in.value, DecodeTensor(req.value(), "value", AcceptedDTypes::kFloat32));
  ASSIGN_OR_RETURN(in.key_padding_mask,
                   DecodeTensor(req.key_padding_mask(), "key_padding_mask", AcceptedDTypes::kFloat32OrBool));
  ASSIGN_OR_RETURN(in.attn_mask, DecodeTensor(req.attn_mask(), "attn_mask", AcceptedDTypes::kFloat32OrBool));
  in.is_causal = req.is_causal();
  in.need_weights = req.need_weights();
  in.average_attn_weights = !req.has_average_attn_weights() || req.average_attn_weights();
  ASSIGN_OR_RETURN(ParsedAttention parsed, call->layer->engine->Validate(in));
  call->query_tokens = parsed.query_tokens();
  call->flops = AttentionFlops(call->layer->engine->config(), parsed.batch, parsed.q_len, parsed.kv_len);
  return absl::OkStatus();
}

}  // namespace attnserve
