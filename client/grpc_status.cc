#include "client/grpc_status.h"

#include "absl/strings/str_cat.h"

namespace attnserve {

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

std::string ServerTraceId(const grpc::ClientContext& context) {
  const auto& metadata = context.GetServerInitialMetadata();
  const auto it = metadata.find("traceparent");
  // "00-<trace id>-<span id>-<flags>"
  if (it == metadata.end() || it->second.size() < 35 || it->second.data()[2] != '-') return "";
  return std::string(it->second.data() + 3, 32);
}

absl::Status FromGrpcStatus(const grpc::Status& status, const grpc::ClientContext& context) {
  if (status.ok()) return absl::OkStatus();
  const std::string trace_id = ServerTraceId(context);
  if (trace_id.empty()) return FromGrpcStatus(status);
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      absl::StrCat(status.error_message(), " [trace_id ", trace_id, "]"));
}

std::string StatusCodeName(int code) {
  std::string name = absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  return name.empty() ? absl::StrCat("CODE_", code) : name;
}

}  // namespace attnserve
