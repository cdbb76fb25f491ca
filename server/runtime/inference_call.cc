#include "server/runtime/inference_call.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
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
    call->layer = registry.Find(call->layer_name, call->version);
    if (call->layer == nullptr) {
      return absl::NotFoundError(absl::StrCat(call->version_field, ": layer '", call->layer_name, "' has version(s) ",
                                              absl::StrJoin(registry.Versions(call->layer_name), ", "), ", not ",
                                              call->version));
    }
  }
  ATTN_RETURN_IF_ERROR(call->decode_status);
  ATTN_ASSIGN_OR_RETURN(call->parsed, call->layer->engine->Validate(call->inputs));
  return absl::OkStatus();
}

void RunAfterAdmission(InferenceCall* call) {
  for (auto& work : call->after_admission) work(*call);
  call->after_admission.clear();
}

}  // namespace attnserve
