#include "server/runtime/inference_call.h"

#include "absl/strings/str_cat.h"
#include "common/log_string.h"
#include "common/status_macros.h"

namespace attnserve {

absl::Status ValidateCall(const LayerRegistry& registry, InferenceCall* call) {
  if (call->layer_name.empty()) return absl::NotFoundError(absl::StrCat(call->layer_field, ": is required"));
  call->layer = registry.Find(call->layer_name);
  if (call->layer == nullptr) {
    return absl::NotFoundError(
        absl::StrCat(call->layer_field, ": no layer named '", BoundedForLog(call->layer_name), "'"));
  }
  if (call->version != 0 && call->version != call->layer->version) {
    return absl::NotFoundError(absl::StrCat("version: layer '", call->layer_name, "' serves version ",
                                            call->layer->version, ", not ", call->version));
  }
  ATTN_RETURN_IF_ERROR(call->decode_status);
  ATTN_ASSIGN_OR_RETURN(call->parsed, call->layer->engine->Validate(call->inputs));
  return absl::OkStatus();
}

}  // namespace attnserve
