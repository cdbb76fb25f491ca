// The one place where gRPC statuses become absl::Status (both use google.rpc.Code numbering, so the code is
// kept as it is), and code names for messages and reports.
#pragma once

#include <string>

#include <grpcpp/client_context.h>
#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace attnserve {

absl::Status FromGrpcStatus(const grpc::Status& status);

// The trace id of the traceparent the server returned in `context`'s initial metadata (read once the call
// has finished); empty when there is none.
std::string ServerTraceId(const grpc::ClientContext& context);

// FromGrpcStatus, with " [trace_id <id>]" appended to an error's message when the server returned a trace
// id: the id its log lines and access log carry for the call.
absl::Status FromGrpcStatus(const grpc::Status& status, const grpc::ClientContext& context);

// "OK", "UNAVAILABLE", ...; "CODE_<n>" for a value outside google.rpc.Code.
std::string StatusCodeName(int code);

}  // namespace attnserve
