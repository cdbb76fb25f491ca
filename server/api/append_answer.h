// A session's AppendResponse from its InferenceCall: as the copying reference encodes it, and as it is served,
// the FLOAT32 output and weights sent from the engine's tensors (infer_answer.h).
#pragma once

#include <cstdint>

#include "attnserve/v1/session.pb.h"
#include "server/api/infer_answer.h"
#include "server/runtime/inference_call.h"

namespace attnserve {

// The answer of an append finished OK: id, output [T, E], attn_weights when asked, the layer's token count after
// it (`position`), timing.
void EncodeAppendResponse(const InferenceCall& call, int64_t position, attnserve::v1::AppendResponse* response);

// The same as it is served (EncodeAnswerTensors): the tensors' values moved into `answer` when sent in place,
// else encoded and call->outputs freed.
void EncodeAppendAnswer(InferenceCall* call, int64_t position, AppendAnswer* answer);

}  // namespace attnserve
