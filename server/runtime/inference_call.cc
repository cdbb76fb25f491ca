#include "server/runtime/inference_call.h"

#include "absl/strings/str_cat.h"
#include "common/log_string.h"
#include "common/status_macros.h"

namespace attnserve {

absl::Status ValidateCall(const LayerRegistry& registry, InferenceCall* call) {
  if (call->layer_name.empty()) return absl::NotFoundError("layer: is required");
  call->layer = registry.Find(call->layer_name);
  if (call->layer == nullptr) {
    return absl::NotFoundError(absl::StrCat("layer: no layer named '", BoundedForLog(call->layer_name), "'"));
  }
  ATTN_RETURN_IF_ERROR(call->decode_status);
  ATTN_ASSIGN_OR_RETURN(call->parsed, call->layer->engine->Validate(call->inputs));
  return absl::OkStatus();
}

}  // namespace attnserve
