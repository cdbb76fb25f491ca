// W3C Trace Context on every RPC: a server interceptor reads the client's `traceparent` and `tracestate`,
// starts the server's span (observability/trace_context.h) and returns its `traceparent` (and the client's
// `tracestate`) in the response's initial metadata, errors included. A malformed or missing traceparent is
// never an error: the RPC gets a fresh trace id. Handlers find the same span with TraceOf(ctx).
#pragma once

#include <grpcpp/grpcpp.h>
#include <grpcpp/support/server_interceptor.h>

#include "server/observability/trace_context.h"

namespace attnserve {

class TraceInterceptorFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override;
};

// The span the interceptor started for the RPC of `ctx`; a fresh one when no interceptor ran (a service
// built without the server, in tests).
TraceContext TraceOf(const grpc::ServerContextBase& ctx);

}  // namespace attnserve
