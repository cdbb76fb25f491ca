// Who may call: the "authorization: Bearer <token>" metadata of a call against the token file
// (server/security/credential_store.h). Health checks are never asked (the kubelet's probes have no token).
//
// Thread-safety: immutable after construction; the store reloads itself.
#pragma once

#include <grpcpp/grpcpp.h>
#include <grpcpp/support/server_interceptor.h>

#include <cstdint>
#include <memory>
#include <string>

#include "server/security/credential_store.h"

namespace attnserve {

class Authorizer {
 public:
  // `tokens` null: authentication is off and every caller has the infer and admin scopes.
  explicit Authorizer(const CredentialStore* tokens) : tokens_(tokens) {}

  bool enabled() const { return tokens_ != nullptr; }
  // Scopes of the bearer token in `metadata` (gRPC's client metadata); kScopeNone without a listed token.
  uint32_t ScopesOf(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const;
  // OK; UNAUTHENTICATED without a token the file lists; PERMISSION_DENIED when its scopes lack `scope`.
  grpc::Status Check(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata, Scope scope) const;
  grpc::Status Check(const grpc::ServerContextBase& ctx, Scope scope) const {
    return Check(ctx.client_metadata(), scope);
  }
  // The SHA-256 of the call's bearer token (32 bytes), what identifies a caller (its sessions are its own);
  // empty without a token or with authentication off.
  std::string TokenDigest(const grpc::ServerContextBase& ctx) const;
  // Whether layer info may show file paths: only to an admin token (never with authentication off).
  bool MayShowPaths(const grpc::ServerContextBase& ctx) const {
    return enabled() && (ScopesOf(ctx.client_metadata()) & kScopeAdmin) != 0;
  }

 private:
  const CredentialStore* tokens_;
};

// gRPC's reflection service, which we cannot change, behind the infer scope: a caller without it has its
// requests emptied before reflection reads them (so it learns nothing) and its status replaced by the
// Authorizer's. Other methods pass untouched.
class ReflectionGuardFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit ReflectionGuardFactory(const Authorizer* authorizer) : authorizer_(authorizer) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override;

 private:
  const Authorizer* authorizer_;
};

}  // namespace attnserve
