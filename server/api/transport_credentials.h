// The gRPC port's credentials from the config's security section: plaintext without TLS files; TLS (and
// mTLS with a client CA) otherwise, from files that gRPC's file watcher re-reads, so a rotated certificate
// is served without a restart.
#pragma once

#include <memory>

#include <grpcpp/security/server_credentials.h>

#include "absl/status/statusor.h"
#include "attnserve/v1/config.pb.h"

namespace attnserve {

// Checks the files first (readable PEM, the key matching the certificate, a CA bundle with at least one
// certificate): InvalidArgument naming the field and the path otherwise, so a bad deployment fails at
// start rather than at every handshake.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> BuildServerCredentials(
    const attnserve::v1::SecurityConfig& security);

}  // namespace attnserve
