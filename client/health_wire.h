// grpc.health.v1's two one-field messages, encoded by hand. grpc++ ships no C++ health client, and compiling
// a second copy of health.proto would register grpc.health.v1 twice in any binary that also links the
// tests' stubs (protobuf aborts on that); the wire format of these messages is two lines of code.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace attnserve {

// HealthCheckRequest{service}.
std::string EncodeHealthCheckRequest(absl::string_view service);

// HealthCheckResponse.status (a ServingStatus value; 0 = UNKNOWN when absent). InvalidArgument for bytes
// that are not a protobuf message.
absl::StatusOr<int> DecodeHealthCheckResponse(absl::string_view bytes);

}  // namespace attnserve
