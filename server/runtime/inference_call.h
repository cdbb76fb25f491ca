// One inference request on its way through the server, whatever wire protocol brought it:
//   decode (api/) -> validate (ValidateCall) -> admit and queue (Dispatcher) -> batch -> engine
//   (BatchExecutor) -> answer (`finish`, which the protocol's service turns into its response).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "core/attention_inputs.h"
#include "core/decoder_inputs.h"
#include "core/multihead_attention.h"
#include "server/batching/batch_scheduler.h"
#include "server/runtime/layer_registry.h"
#include "server/runtime/memory_budget.h"
#include "server/observability/trace_context.h"

namespace attnserve {

// Where an answered request's time went, for its response and its log line.
// A chunked append's (sessions/prefill_chunks.h): compute_us is its chunks' batches' engine time, and queue_us
// the rest of the time from its arrival to the start of its last chunk's compute.
struct CallTiming {
  int64_t queue_us = 0;    // arrival to the start of its batch's compute
  int64_t compute_us = 0;  // its batch's engine time
  int32_t batch_size = 0;  // requests computed together
};

struct InferenceCall {
  // Set by the protocol's service when the request arrives.
  std::string layer_name;  // as the client sent it (NOT_FOUND names it; metrics fold unknown ones)
  const char* layer_field = "layer";      // the request field that named it, for error messages
  const char* version_field = "version";  // the same for the version
  std::string id;          // the client's request id, for log lines
  const char* rpc = "";    // the method that brought it ("Infer", "ModelInfer", "Append", ...), a literal
  TraceContext trace;      // the RPC's trace (W3C traceparent), for its log lines and the access log
  int64_t version = 0;     // the layer version the client asked for; 0: the newest
  AttentionInputs inputs;  // views into the protocol's request message, which outlives the call
  // The answer's element type on the wire (the protocol's output_dtype): kFloat32, kBFloat16 or kFloat16.
  DType output_dtype = DType::kFloat32;
  // Whether the protocol sends a FLOAT32 answer's values from the engine's tensors (held once until written)
  // rather than encoding them into its message (held twice); AnswerHeldBytes counts by it.
  bool answer_values_in_place = false;
  // Why the protocol could not decode `inputs`, if it could not: reported by ValidateCall after the layer
  // lookup, so that an unknown layer is NOT_FOUND whatever its tensors.
  absl::Status decode_status;
  int64_t request_bytes = 0;  // the request message's size, part of what the call reserves
  absl::Time arrival;
  absl::Time deadline = absl::InfiniteFuture();
  std::function<bool()> is_cancelled;  // may be empty
  // Answers the call, exactly once, with OK (then `outputs` and `timing` hold the answer) or the error.
  // The call object may be destroyed right after.
  std::function<void(const absl::Status&)> finish;

  // Set by ValidateCall: the layer version the call was admitted with (held until it is answered, so a
  // replaced layer finishes its requests) and the request checked against it (once: the engine reuses it).
  std::shared_ptr<const ServedLayer> layer;
  ParsedAttention parsed;  // parsed.inputs points at `inputs`: the call must not move (it lives in a unique_ptr)
  // A DECODER_ATTENTION layer's request: `inputs` as the decoder takes it, validated by it. `parsed` then holds
  // only the summary the stages share (batch, lengths, flops, answer bytes).
  DecoderInputs decoder_inputs;
  ParsedDecoder decoder_parsed;
  // Set by the Dispatcher at admission: the call's share of the memory budget. The protocol's service takes
  // it over in `finish` and releases it once the answer has been written.
  MemoryBudget::Reservation memory;

  // A session's append (SessionService) instead of stateless inputs: the session service sets `layer` (the
  // version the session holds) and this; the dispatcher admits it without ValidateCall and the executor runs
  // it through ForwardAppends. `inputs` and `parsed` are unused.
  struct SessionWork {
    CachedAppend append;               // its cache has the append's blocks reserved
    std::shared_ptr<void> keep_alive;  // the session, so the cache outlives the call
  };
  std::unique_ptr<SessionWork> session;
  // A call the server made itself (a chunk of a long append): admitted and queued like any call, but not
  // counted in the request metrics or logged; the client's own call is.
  bool internal = false;
  // Its finish counts and logs it already (Dispatcher::Instrument).
  bool instrumented = false;

  // Set by the executor before finish(OK).
  AttentionOutputs outputs;
  CallTiming timing;
};

// The per-layer queues and workers, carrying calls.
using CallScheduler = BatchScheduler<std::unique_ptr<InferenceCall>>;

// The validate stage: the newest version of call->layer_name (NOT_FOUND "layer: no layer named 'x'", or
// "layer: is required"; NOT_FOUND "version: ..." when call->version is set and is not the one served), then
// decode_status, then the inputs against the layer (INVALID_ARGUMENT naming the field). Sets `layer` and
// `parsed`.
absl::Status ValidateCall(const LayerRegistry& registry, InferenceCall* call);

// Whether the call's answer goes on the wire from the engine's tensors: a FLOAT32 answer of a protocol that
// sends values in place.
inline bool AnswerSentInPlace(const InferenceCall& call) {
  return call.answer_values_in_place && call.output_dtype == DType::kFloat32;
}

// What the admit stage reserves for a validated call: RequestCostBytes, AppendCostBytes or DecoderCostBytes
// by its kind.
int64_t CallCostBytes(const InferenceCall& call);

}  // namespace attnserve
