#include "server/api/authorizer.h"

#include <google/protobuf/message.h>

#include <cstring>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"

namespace attnserve {
namespace {

constexpr char kReflectionMethodPrefix[] = "/grpc.reflection.";

// The token of "Bearer <token>" (scheme case-insensitive); empty when there is none.
absl::string_view BearerToken(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) {
  const auto it = metadata.find("authorization");
  if (it == metadata.end()) return {};
  const absl::string_view value(it->second.data(), it->second.size());
  constexpr absl::string_view kScheme = "bearer ";
  if (value.size() <= kScheme.size() || !absl::EqualsIgnoreCase(value.substr(0, kScheme.size()), kScheme)) return {};
  return absl::StripAsciiWhitespace(value.substr(kScheme.size()));
}

class ReflectionGuard final : public grpc::experimental::Interceptor {
 public:
  explicit ReflectionGuard(const Authorizer* authorizer) : authorizer_(authorizer) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    using Hook = grpc::experimental::InterceptionHookPoints;
    if (methods->QueryInterceptionHookPoint(Hook::POST_RECV_INITIAL_METADATA)) {
      denied_ = authorizer_->Check(*methods->GetRecvInitialMetadata(), kScopeInfer);
    }
    if (!denied_.ok() && methods->QueryInterceptionHookPoint(Hook::POST_RECV_MESSAGE)) {
      if (void* message = methods->GetRecvMessage()) static_cast<google::protobuf::Message*>(message)->Clear();
    }
    if (!denied_.ok() && methods->QueryInterceptionHookPoint(Hook::PRE_SEND_STATUS)) {
      methods->ModifySendStatus(denied_);
    }
    methods->Proceed();
  }

 private:
  const Authorizer* authorizer_;
  grpc::Status denied_;  // OK until the metadata says otherwise
};

}  // namespace

std::string Authorizer::TokenDigest(const grpc::ServerContextBase& ctx) const {
  if (tokens_ == nullptr) return {};
  const absl::string_view token = BearerToken(ctx.client_metadata());
  if (token.empty()) return {};
  const Sha256Digest digest = Sha256(token);
  return std::string(reinterpret_cast<const char*>(digest.data()), digest.size());
}

uint32_t Authorizer::ScopesOf(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const {
  if (tokens_ == nullptr) return kScopeInfer | kScopeAdmin;
  const absl::string_view token = BearerToken(metadata);
  if (token.empty()) return kScopeNone;
  return tokens_->ScopesOf("", token);
}

grpc::Status Authorizer::Check(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                               Scope scope) const {
  if (tokens_ == nullptr) return grpc::Status::OK;
  const uint32_t scopes = ScopesOf(metadata);
  if (scopes == kScopeNone) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "authorization: expected \"Bearer <token>\" with a token the server lists");
  }
  if ((scopes & scope) == 0) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        std::string("authorization: the token lacks the ") + ScopeName(scope) + " scope");
  }
  return grpc::Status::OK;
}

grpc::experimental::Interceptor* ReflectionGuardFactory::CreateServerInterceptor(
    grpc::experimental::ServerRpcInfo* info) {
  if (!authorizer_->enabled() || std::strncmp(info->method(), kReflectionMethodPrefix,
                                              sizeof(kReflectionMethodPrefix) - 1) != 0) {
    return nullptr;
  }
  return new ReflectionGuard(authorizer_);
}

}  // namespace attnserve
