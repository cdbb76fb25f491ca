// attnserve::SessionClient: sessions (attnserve.v1.SessionService) from C++. A session lives on the server
// that created it, so every call of a session must reach that server:
// - A Client whose target lists several addresses ("ipv4:10.0.0.1:50051,10.0.0.2:50051", "ipv6:[...]:p,...")
//   gets one channel per address here, and a session is pinned to the address its routing key hashes to
//   (FNV-1a, the same on every call and in every process), the one CreateSession went to. The routing key is
//   the id up to its first ':' (the whole id without one), as the session proxy's: a fork lives on its
//   parent's server, so name it "<parent>:<suffix>".
// - Any other target (one address, a dns:/// name, a proxy) uses the Client's channel; every call carries
//   the id in the x-attnserve-session metadata, which a proxy hashes on (deploy/session-proxy).
//
// Thread-safety: every method may be called from any number of threads at once; appends of one session and
// layer are answered in the order the server receives them.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "attnserve/v1/session.grpc.pb.h"
#include "client/client.h"

namespace attnserve {

class SessionClient {
 public:
  // `client` (not owned) must outlive this; its TLS, token and timeout apply.
  static absl::StatusOr<std::unique_ptr<SessionClient>> Create(const Client* client);

  struct SessionOptions {
    std::string session_id;           // 1 to 128 bytes of [A-Za-z0-9._:-]
    std::vector<std::string> layers;  // at least one
    int64_t max_tokens = 0;           // 0: the layers' max_sequence_length
    int64_t idle_timeout_ms = 0;      // 0: the server's default
  };
  absl::StatusOr<attnserve::v1::Session> CreateSession(const SessionOptions& options) const;

  struct AppendResult {
    Client::Tensor output;        // [T, E]
    Client::Tensor attn_weights;  // need_weights only: [T, tokens] averaged, or [H, T, tokens]
    int64_t position = 0;         // the layer's tokens after the append
  };
  // `query`: T new tokens, row-major [tokens, E].
  absl::StatusOr<AppendResult> Append(const std::string& session_id, const std::string& layer,
                                      absl::Span<const float> query, int64_t tokens, bool need_weights = false,
                                      bool average_attn_weights = true) const;
  absl::StatusOr<attnserve::v1::Session> Fork(const std::string& session_id, const std::string& new_session_id) const;
  absl::StatusOr<attnserve::v1::Session> Truncate(const std::string& session_id, int64_t tokens) const;
  absl::StatusOr<attnserve::v1::Session> Get(const std::string& session_id) const;
  absl::Status Close(const std::string& session_id) const;

  // The addresses sessions are pinned to (empty: the Client's channel for all), and which one a session uses.
  const std::vector<std::string>& addresses() const { return addresses_; }
  size_t AddressOf(const std::string& session_id) const;
  // The id up to its first ':'.
  static std::string RoutingKey(const std::string& session_id) { return session_id.substr(0, session_id.find(':')); }

  // "ipv4:a:1,b:2" -> {"ipv4:a:1", "ipv4:b:2"}; any other target -> {} (sessions use the Client's channel).
  static std::vector<std::string> SplitTarget(const std::string& target);
  // The stub a session's calls go through (for tools that call asynchronously).
  attnserve::v1::SessionService::Stub* StubFor(const std::string& session_id) const;

 private:
  explicit SessionClient(const Client* client) : client_(client) {}
  void Prepare(grpc::ClientContext* context, const std::string& session_id) const;

  const Client* client_;
  std::vector<std::string> addresses_;
  std::vector<std::unique_ptr<attnserve::v1::SessionService::Stub>> stubs_;  // one per address, or one
};

}  // namespace attnserve
