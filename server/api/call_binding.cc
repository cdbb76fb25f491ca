#include "server/api/call_binding.h"

#include <chrono>
#include <new>
#include <utility>

#include "server/api/grpc_status.h"

namespace attnserve {

absl::Time DeadlineOf(const grpc::CallbackServerContext& ctx) {
  const auto deadline = ctx.deadline();
  // No deadline is reported as a far-away time point; anything beyond a year counts as none.
  if (deadline - std::chrono::system_clock::now() > std::chrono::hours(24 * 365)) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

void BindCall(grpc::CallbackServerContext* ctx, const char* rpc, const TraceContext& trace, const Clock& clock,
              int64_t request_bytes, InferenceCall* call) {
  call->rpc = rpc;
  call->trace = trace;
  call->arrival = clock.Now();
  call->request_bytes = request_bytes;
  call->deadline = DeadlineOf(*ctx);
  call->is_cancelled = [ctx] { return ctx->IsCancelled(); };
}

void FinishWith(InferenceCall* call, std::function<void()> encode, OnAnswer on_answer) {
  call->finish = [call, encode = std::move(encode), on_answer = std::move(on_answer)](const absl::Status& status) {
    absl::Status answer = status;
    if (answer.ok()) {
      try {
        encode();
      } catch (const std::bad_alloc&) {  // a worker must not die of an answer it cannot allocate
        answer = absl::ResourceExhaustedError("out of memory while encoding the answer");
      }
    }
    on_answer(ToGrpcStatus(answer), std::move(call->memory));
  };
}

}  // namespace attnserve
