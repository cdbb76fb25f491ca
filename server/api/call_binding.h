// What every protocol's service does to turn a gRPC call into an InferenceCall and its answer back into a
// response: the call's arrival, size, deadline and cancellation from the gRPC context, and a `finish` that
// encodes the response and converts the status (the one place absl::Status becomes grpc::Status for
// inference calls).
#pragma once

#include <cstdint>
#include <functional>

#include <grpcpp/grpcpp.h>

#include "absl/time/time.h"
#include "server/api/answering_stream.h"
#include "server/api/call_trace.h"
#include "server/batching/clock.h"
#include "server/runtime/inference_call.h"

namespace attnserve {

// The context's deadline; InfiniteFuture when the client set none.
absl::Time DeadlineOf(const grpc::CallbackServerContext& ctx);

// Sets call->rpc (a literal naming the method), trace (the RPC's, from StartTrace), arrival (from `clock`),
// request_bytes, deadline and is_cancelled from `ctx`, which must outlive the call.
void BindCall(grpc::CallbackServerContext* ctx, const char* rpc, const TraceContext& trace, const Clock& clock,
              int64_t request_bytes, InferenceCall* call);

// Sets call->finish: on OK `encode` fills the response (running out of memory doing so is
// RESOURCE_EXHAUSTED, not a dead worker), then `on_answer` gets the gRPC status and the call's reservation.
void FinishWith(InferenceCall* call, std::function<void()> encode, OnAnswer on_answer);

}  // namespace attnserve
