// The one place where gRPC statuses become absl::Status (both use google.rpc.Code numbering, so the code is
// kept as it is), and code names for messages and reports.
#pragma once

#include <string>

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace attnserve {

absl::Status FromGrpcStatus(const grpc::Status& status);

// "OK", "UNAVAILABLE", ...; "CODE_<n>" for a value outside google.rpc.Code.
std::string StatusCodeName(int code);

}  // namespace attnserve
