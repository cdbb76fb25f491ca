// A server interceptor counting each call by method and final status (server/api/call_counts.h),
// for every gRPC server of ours: what reaches the dispatcher and what is refused before it.
//
// The status counted is the one sent (seen at PRE_SEND_STATUS, after the interceptors before this one have
// changed it: install it last), or CANCELLED when the client cancelled the call first (its handler still
// finishes it) or the call ended without a status (a stream reset). Calls gRPC refuses before any interceptor
// runs (while the server shuts down, streams over its limits) are not counted.
#pragma once

#include <string>
#include <vector>

#include <grpcpp/support/server_interceptor.h>

#include "server/api/call_counts.h"

namespace attnserve {

class CallCounterFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  // `counts` must outlive the servers this is installed in.
  explicit CallCounterFactory(CallCounts* counts) : counts_(counts) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override;

 private:
  CallCounts* const counts_;
};

// gRPC's names ("/package.Service/Method") of the methods of `services` (full names in the generated
// descriptor pool; unknown ones add nothing), of gRPC's health service and of its reflection service.
std::vector<std::string> ServedMethodPaths(const std::vector<std::string>& services);

}  // namespace attnserve
