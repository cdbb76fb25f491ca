#include "server/api/served_rpc.h"

#include <google/protobuf/descriptor.h>

#include "absl/status/status.h"
#include "common/log_string.h"

namespace attnserve {

ServedRpc::ServedRpc(grpc::CallbackServerContext* ctx, CallCounts* counts, const char* path)
    : ctx_(ctx),
      counts_(counts),
      method_(counts == nullptr ? 0 : counts->MethodIndex(path)),
      trace_(StartTrace(ctx)) {}

const grpc::Status& ServedRpc::Ended(const grpc::Status& status) const {
  if (counts_ != nullptr) {
    counts_->Count(method_, ctx_->IsCancelled() ? absl::StatusCode::kCancelled
                                                : static_cast<absl::StatusCode>(status.error_code()));
  }
  return status;
}

grpc::ServerGenericBidiReactor* UnknownMethodService::CreateReactor(grpc::GenericCallbackServerContext* ctx) {
  const ServedRpc rpc(ctx, counts_, nullptr);  // "other", whatever the path (a served one on the health port)
  return new RefusedStream(rpc, grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "method: this server has no method '" +
                                                                                  BoundedForLog(ctx->method()) + "'"));
}

std::vector<std::string> ServedMethodPaths(const std::vector<std::string>& services) {
  std::vector<std::string> paths;
  for (const std::string& name : services) {
    const google::protobuf::ServiceDescriptor* service =
        google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(name);
    if (service == nullptr) continue;
    for (int m = 0; m < service->method_count(); ++m) {
      paths.push_back("/" + service->full_name() + "/" + service->method(m)->name());
    }
  }
  return paths;
}

}  // namespace attnserve
