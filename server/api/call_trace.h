// W3C Trace Context on every RPC: each RPC handler first calls StartTrace (through ServedRpc, served_rpc.h),
// which reads the client's `traceparent` and `tracestate`, starts the server's span
// (observability/trace_context.h) and returns its `traceparent` (and the client's `tracestate`) in the
// response's initial metadata, errors included. A
// malformed or missing traceparent is never an error: the RPC gets a fresh trace id.
//
// A handler call rather than a server interceptor: gRPC 1.51 builds an interceptor for every stream, also for
// the streams a client opens and resets at once, and under a rapid-reset flood (CVE-2023-44487) that cost
// doubled the memory the flood took and kept the server from answering anyone for tens of seconds.
#pragma once

#include <grpcpp/grpcpp.h>

#include "server/observability/trace_context.h"

namespace attnserve {

// Starts the RPC's server span and adds its traceparent to `ctx`'s initial metadata. Call once per RPC, before
// anything is sent.
TraceContext StartTrace(grpc::CallbackServerContext* ctx);

}  // namespace attnserve
