// One accepted inference request on its way: validate -> queue -> batch -> engine -> response.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <grpcpp/support/status.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "attnserve/v1/attention.pb.h"
#include "core/attention_inputs.h"
#include "server/layer_registry.h"

namespace attnserve {

struct InferenceCall {
  const attnserve::v1::InferRequest* request = nullptr;  // not owned; valid until `finish` is called
  attnserve::v1::InferResponse* response = nullptr;      // not owned; filled before `finish`
  const ServedLayer* layer = nullptr;
  AttentionInputs inputs;  // views into *request
  int64_t query_tokens = 0;
  int64_t flops = 0;
  absl::Time arrival;
  absl::Time deadline = absl::InfiniteFuture();
  std::function<bool()> is_cancelled;
  // Answers the call, exactly once; the call object may be destroyed right after.
  std::function<void(const grpc::Status&)> finish;
};

// The validate stage: finds the layer (NOT_FOUND), decodes every tensor (INVALID_ARGUMENT naming the
// field), and checks the request against the layer (shapes, masks, limits). Fills layer, inputs,
// query_tokens and flops of `call`.
absl::Status PrepareInferenceCall(const LayerRegistry& registry, InferenceCall* call);

}  // namespace attnserve
