#include "client/session_client.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/grpc_status.h"
#include "common/status_macros.h"

namespace attnserve {

std::vector<std::string> SessionClient::SplitTarget(const std::string& target) {
  for (const char* scheme : {"ipv4:", "ipv6:"}) {
    if (target.rfind(scheme, 0) != 0) continue;
    std::vector<std::string> out;
    for (absl::string_view a : absl::StrSplit(target.substr(5), ',', absl::SkipEmpty())) {
      out.push_back(absl::StrCat(scheme, a));
    }
    return out.size() > 1 ? out : std::vector<std::string>{};
  }
  return {};
}

absl::StatusOr<std::unique_ptr<SessionClient>> SessionClient::Create(const Client* client) {
  if (client == nullptr) return absl::InvalidArgumentError("SessionClient: a Client is required");
  std::unique_ptr<SessionClient> sc(new SessionClient(client));
  sc->addresses_ = SplitTarget(client->options().target);
  for (const std::string& address : sc->addresses_) {
    sc->stubs_.push_back(attnserve::v1::SessionService::NewStub(client->ChannelTo(address)));
  }
  if (sc->stubs_.empty()) sc->stubs_.push_back(attnserve::v1::SessionService::NewStub(client->channel()));
  return sc;
}

size_t SessionClient::AddressOf(const std::string& session_id) const {
  uint64_t h = 14695981039346656037ull;  // FNV-1a: the same in every process
  for (unsigned char c : RoutingKey(session_id)) h = (h ^ c) * 1099511628211ull;
  return static_cast<size_t>(h % stubs_.size());
}

attnserve::v1::SessionService::Stub* SessionClient::StubFor(const std::string& session_id) const {
  return stubs_[AddressOf(session_id)].get();
}

void SessionClient::Prepare(grpc::ClientContext* context, const std::string& session_id) const {
  client_->PrepareContext(context, std::nullopt);
  context->AddMetadata("x-attnserve-session", session_id);
}

absl::StatusOr<attnserve::v1::Session> SessionClient::CreateSession(const SessionOptions& options) const {
  attnserve::v1::CreateSessionRequest request;
  request.set_session_id(options.session_id);
  for (const std::string& layer : options.layers) request.add_layers(layer);
  request.set_max_tokens(options.max_tokens);
  request.set_idle_timeout_ms(options.idle_timeout_ms);
  grpc::ClientContext context;
  Prepare(&context, options.session_id);
  attnserve::v1::Session session;
  grpc::Status s = StubFor(options.session_id)->CreateSession(&context, request, &session);
  if (!s.ok()) return FromGrpcStatus(s, context);
  return session;
}

absl::StatusOr<SessionClient::AppendResult> SessionClient::Append(const std::string& session_id,
                                                                  const std::string& layer,
                                                                  absl::Span<const float> query, int64_t tokens,
                                                                  bool need_weights, bool average_attn_weights) const {
  if (tokens < 1 || query.size() % static_cast<size_t>(tokens) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("query: ", query.size(), " values are not ", tokens, " rows"));
  }
  attnserve::v1::AppendRequest request;
  request.set_session_id(session_id);
  request.set_layer(layer);
  attnserve::v1::Tensor* q = request.mutable_query();
  q->add_shape(tokens);
  q->add_shape(static_cast<int64_t>(query.size()) / tokens);
  q->set_dtype(attnserve::v1::FLOAT32);
  q->set_raw_data(query.data(), query.size() * sizeof(float));
  request.set_need_weights(need_weights);
  request.set_average_attn_weights(average_attn_weights);
  grpc::ClientContext context;
  Prepare(&context, session_id);
  attnserve::v1::AppendResponse response;
  grpc::Status s = StubFor(session_id)->Append(&context, request, &response);
  if (!s.ok()) return FromGrpcStatus(s, context);
  AppendResult result;
  ATTN_ASSIGN_OR_RETURN(result.output, Client::ReadTensor(response.output(), "output"));
  if (need_weights) {
    ATTN_ASSIGN_OR_RETURN(result.attn_weights, Client::ReadTensor(response.attn_weights(), "attn_weights"));
  }
  result.position = response.position();
  return result;
}

absl::StatusOr<attnserve::v1::Session> SessionClient::Fork(const std::string& session_id,
                                                           const std::string& new_session_id) const {
  // The fork lives where its parent does, so its calls must go there too: with several addresses its routing
  // key must lead to the same one ("<parent>:<suffix>" does).
  if (AddressOf(new_session_id) != AddressOf(session_id)) {
    return absl::InvalidArgumentError(absl::StrCat("new_session_id: '", new_session_id,
                                                   "' routes to another server than '", session_id, "'; name it '",
                                                   RoutingKey(session_id), ":<suffix>'"));
  }
  attnserve::v1::ForkSessionRequest request;
  request.set_session_id(session_id);
  request.set_new_session_id(new_session_id);
  grpc::ClientContext context;
  Prepare(&context, session_id);
  attnserve::v1::Session session;
  grpc::Status s = StubFor(session_id)->ForkSession(&context, request, &session);
  if (!s.ok()) return FromGrpcStatus(s, context);
  return session;
}

absl::StatusOr<attnserve::v1::Session> SessionClient::Truncate(const std::string& session_id, int64_t tokens) const {
  attnserve::v1::TruncateSessionRequest request;
  request.set_session_id(session_id);
  request.set_tokens(tokens);
  grpc::ClientContext context;
  Prepare(&context, session_id);
  attnserve::v1::Session session;
  grpc::Status s = StubFor(session_id)->TruncateSession(&context, request, &session);
  if (!s.ok()) return FromGrpcStatus(s, context);
  return session;
}

absl::StatusOr<attnserve::v1::Session> SessionClient::Get(const std::string& session_id) const {
  attnserve::v1::GetSessionRequest request;
  request.set_session_id(session_id);
  grpc::ClientContext context;
  Prepare(&context, session_id);
  attnserve::v1::Session session;
  grpc::Status s = StubFor(session_id)->GetSession(&context, request, &session);
  if (!s.ok()) return FromGrpcStatus(s, context);
  return session;
}

absl::Status SessionClient::Close(const std::string& session_id) const {
  attnserve::v1::CloseSessionRequest request;
  request.set_session_id(session_id);
  grpc::ClientContext context;
  Prepare(&context, session_id);
  attnserve::v1::CloseSessionResponse response;
  grpc::Status s = StubFor(session_id)->CloseSession(&context, request, &response);
  return FromGrpcStatus(s, context);
}

}  // namespace attnserve
