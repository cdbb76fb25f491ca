// Credential files: the token file (who may call the gRPC port, with which scopes) and the /metrics basic
// auth file. Secrets are never stored, only their SHA-256, so the files can be shared with whoever deploys.
//
//   token file:       sha256:<64 hex digits> <scope>[,<scope>]     scopes: infer, admin
//   basic auth file:  <user> sha256:<64 hex digits of the password>
//
// Blank lines and text after '#' are ignored. The digest of "s3cret" is `printf %s s3cret | sha256sum`.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"

namespace attnserve {

using Sha256Digest = std::array<uint8_t, 32>;

Sha256Digest Sha256(absl::string_view data);

// Scopes a credential grants, as bits.
enum Scope : uint32_t {
  kScopeNone = 0,
  kScopeInfer = 1u << 0,  // Infer, InferStream, ListLayers, GetLayer, reflection
  kScopeAdmin = 1u << 1,  // layer management, sessions of others, file paths in layer info
};
// "infer" or "admin".
const char* ScopeName(Scope scope);

struct Credential {
  std::string user;     // basic auth only; empty for tokens
  Sha256Digest digest;  // of the token or password
  uint32_t scopes = 0;  // tokens: as listed; basic auth: every scope
};

enum class CredentialFileKind { kTokens, kBasicAuth };

// Parses a whole file. InvalidArgument naming the line ("line 3: ...") for a malformed entry: a digest
// that is not "sha256:" and 64 hex digits, an unknown scope, a missing field. A file with no entry is
// valid (nobody may call).
absl::StatusOr<std::vector<Credential>> ParseCredentialFile(absl::string_view text, CredentialFileKind kind);

}  // namespace attnserve
