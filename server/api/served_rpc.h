// What every handler of ours starts an RPC with: its trace (call_trace.h) and its line in
// attnserve_grpc_calls_total (call_counts.h). Whatever finishes the call (FinishNow, a ParsedUnaryReactor, an
// AnsweringStream, a RefusedStream, a layer change) counts it once, through Ended(), with the status it sends,
// or CANCELLED when the client cancelled the call first (its handler still finishes it).
//
// Counted by the handlers rather than by a server interceptor: gRPC 1.51 builds an interceptor for every
// stream, also for the ones a rapid-reset flood (CVE-2023-44487) opens and resets at once, and runs each of
// the call's batches through it (an interceptor for traces once doubled such a flood's memory). So what never
// reaches a handler is not counted: streams reset before their request arrived, calls gRPC refuses itself
// (while shutting down, over its limits), and gRPC's own health and reflection services.
//
// Thread-safety: a ServedRpc is a value (copied into reactors and callbacks); Ended may run on any thread.
#pragma once

#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <grpcpp/generic/async_generic_service.h>

#include "server/api/call_counts.h"
#include "server/api/call_trace.h"

namespace attnserve {

class ServedRpc {
 public:
  // Starts the RPC's trace (adds its traceparent to `ctx`'s initial metadata: call before anything is sent).
  // `path` is gRPC's name of the method, "/package.Service/Method" (null: "other"); `counts` may be null
  // (nothing is counted).
  // `ctx` must outlive every copy.
  ServedRpc(grpc::CallbackServerContext* ctx, CallCounts* counts, const char* path);

  grpc::CallbackServerContext* ctx() const { return ctx_; }
  const TraceContext& trace() const { return trace_; }

  // Counts the call as ending with `status`, or CANCELLED if its client cancelled it; returns `status`, for
  // the reactor's Finish. Once per call.
  const grpc::Status& Ended(const grpc::Status& status) const;

 private:
  grpc::CallbackServerContext* ctx_;
  CallCounts* counts_;
  int method_;
  TraceContext trace_;
};

// A unary reactor already finished with `status`, counted.
inline grpc::ServerUnaryReactor* FinishNow(const ServedRpc& rpc, const grpc::Status& status) {
  grpc::ServerUnaryReactor* reactor = rpc.ctx()->DefaultReactor();
  reactor->Finish(rpc.Ended(status));
  return reactor;
}

// A stream refused before its first read (no token, or one without the scope; an unknown method).
class RefusedStream final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  RefusedStream(const ServedRpc& rpc, const grpc::Status& status) { this->Finish(rpc.Ended(status)); }
  void OnDone() override { delete this; }
};

// Every method a server does not serve, answered UNIMPLEMENTED and counted as method "other" (what gRPC
// does with them by itself, but uncounted). Register on every server of ours. `counts` may be null and must
// outlive the service.
class UnknownMethodService final : public grpc::CallbackGenericService {
 public:
  explicit UnknownMethodService(CallCounts* counts) : counts_(counts) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override;

 private:
  CallCounts* const counts_;
};

// gRPC's names ("/package.Service/Method") of the methods of `services`, full names in the generated
// descriptor pool; unknown ones add nothing.
std::vector<std::string> ServedMethodPaths(const std::vector<std::string>& services);

}  // namespace attnserve
