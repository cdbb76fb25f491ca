#include "server/security/credential_file.h"

#include <openssl/sha.h>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/log_string.h"

namespace attnserve {
namespace {

constexpr absl::string_view kDigestPrefix = "sha256:";

absl::StatusOr<Sha256Digest> ParseDigest(absl::string_view text) {
  if (!absl::ConsumePrefix(&text, kDigestPrefix)) {
    return absl::InvalidArgumentError("expected sha256:<64 hex digits>");
  }
  if (text.size() != 64 || !std::all_of(text.begin(), text.end(), [](char c) { return absl::ascii_isxdigit(c); })) {
    return absl::InvalidArgumentError(absl::StrCat("expected 64 hex digits after sha256:, got ", text.size(),
                                                   " characters"));
  }
  const std::string bytes = absl::HexStringToBytes(text);
  Sha256Digest digest;
  std::copy(bytes.begin(), bytes.end(), digest.begin());
  return digest;
}

absl::StatusOr<uint32_t> ParseScopes(absl::string_view text) {
  uint32_t scopes = 0;
  for (absl::string_view name : absl::StrSplit(text, ',')) {
    if (name == "infer") {
      scopes |= kScopeInfer;
    } else if (name == "admin") {
      scopes |= kScopeAdmin;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown scope \"", BoundedForLog(name),
                                                     "\"; expected infer or admin"));
    }
  }
  return scopes;
}

absl::StatusOr<Credential> ParseEntry(const std::vector<absl::string_view>& fields, CredentialFileKind kind) {
  if (fields.size() != 2) {
    return absl::InvalidArgumentError(kind == CredentialFileKind::kTokens
                                          ? "expected \"sha256:<hex> <scope>[,<scope>]\""
                                          : "expected \"<user> sha256:<hex>\"");
  }
  Credential credential;
  if (kind == CredentialFileKind::kTokens) {
    absl::StatusOr<Sha256Digest> digest = ParseDigest(fields[0]);
    if (!digest.ok()) return digest.status();
    credential.digest = *digest;
    absl::StatusOr<uint32_t> scopes = ParseScopes(fields[1]);
    if (!scopes.ok()) return scopes.status();
    credential.scopes = *scopes;
    return credential;
  }
  credential.user = std::string(fields[0]);
  absl::StatusOr<Sha256Digest> digest = ParseDigest(fields[1]);
  if (!digest.ok()) return digest.status();
  credential.digest = *digest;
  credential.scopes = kScopeInfer | kScopeAdmin;
  return credential;
}

}  // namespace

Sha256Digest Sha256(absl::string_view data) {
  Sha256Digest digest;
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(), digest.data());
  return digest;
}

const char* ScopeName(Scope scope) { return scope == kScopeAdmin ? "admin" : "infer"; }

absl::StatusOr<std::vector<Credential>> ParseCredentialFile(absl::string_view text, CredentialFileKind kind) {
  std::vector<Credential> out;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = line.substr(0, line.find('#'));
    const std::vector<absl::string_view> fields = absl::StrSplit(line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
    if (fields.empty()) continue;
    absl::StatusOr<Credential> credential = ParseEntry(fields, kind);
    if (!credential.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("line ", line_number, ": ", credential.status().message()));
    }
    out.push_back(*std::move(credential));
  }
  return out;
}

}  // namespace attnserve
