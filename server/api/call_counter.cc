#include "server/api/call_counter.h"

#include <google/protobuf/descriptor.h>
#include <grpcpp/server_context.h>

#include "absl/status/status.h"

namespace attnserve {
namespace {

class CallCounter final : public grpc::experimental::Interceptor {
 public:
  CallCounter(CallCounts* counts, grpc::experimental::ServerRpcInfo* info)
      : counts_(counts), info_(info), method_(counts->MethodIndex(info->method())) {}
  ~CallCounter() override {
    if (!counted_) counts_->Count(method_, absl::StatusCode::kCancelled);
  }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      // A handler still finishes a call its client cancelled, with whatever status it chose (gRPC's health
      // Watch says UNKNOWN): the client got none of it.
      const bool cancelled = info_->server_context() != nullptr && info_->server_context()->IsCancelled();
      counts_->Count(method_, cancelled ? absl::StatusCode::kCancelled
                                        : static_cast<absl::StatusCode>(methods->GetSendStatus().error_code()));
      counted_ = true;
    }
    methods->Proceed();
  }

 private:
  CallCounts* const counts_;
  grpc::experimental::ServerRpcInfo* const info_;  // gRPC's, for the call's life
  const int method_;
  bool counted_ = false;  // a call's hooks run one at a time
};

}  // namespace

grpc::experimental::Interceptor* CallCounterFactory::CreateServerInterceptor(
    grpc::experimental::ServerRpcInfo* info) {
  return new CallCounter(counts_, info);
}

std::vector<std::string> ServedMethodPaths(const std::vector<std::string>& services) {
  std::vector<std::string> paths = {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                                    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"};
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
