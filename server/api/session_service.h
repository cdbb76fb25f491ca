// attnserve.v1.SessionService on gRPC's callback API: decodes requests for the SessionStore (sessions/),
// whose appends go through the Dispatcher like Infer calls (admit, queue, batch, engine), and encodes the
// answers. The session id is read from the request, or from the metadata key x-attnserve-session when the
// request's field is empty (what a proxy hashes on to route a session's calls to one replica).
//
// Scopes: every RPC needs infer; ListSessions needs admin.
//
// Thread-safety: gRPC calls the handlers from its own threads; workers finish appends from theirs, and the
// opener's thread CreateSession calls with memories.
#pragma once

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <memory>
#include <string>

#include "attnserve/v1/session.grpc.pb.h"
#include "server/api/answering_stream.h"
#include "server/api/authorizer.h"
#include "server/api/call_counts.h"
#include "server/api/infer_answer.h"
#include "server/api/served_rpc.h"
#include "server/batching/clock.h"
#include "server/runtime/serial_worker.h"
#include "server/sessions/session_store.h"

namespace attnserve {

// gRPC's CallbackService with Append and AppendStream raw: their requests are parsed here (parsed_unary.h,
// answering_stream.h), so that bytes that are not an AppendRequest get INVALID_ARGUMENT. Every method is a
// callback method (a synchronous one would need gRPC's thread pool).
using SessionServiceBase = attnserve::v1::SessionService::WithCallbackMethod_CreateSession<
    attnserve::v1::SessionService::WithRawCallbackMethod_Append<
        attnserve::v1::SessionService::WithRawCallbackMethod_AppendStream<
            attnserve::v1::SessionService::WithCallbackMethod_ForkSession<
                attnserve::v1::SessionService::WithCallbackMethod_TruncateSession<
                    attnserve::v1::SessionService::WithCallbackMethod_CloseSession<
                        attnserve::v1::SessionService::WithCallbackMethod_GetSession<
                            attnserve::v1::SessionService::WithCallbackMethod_ListSessions<
                                attnserve::v1::SessionService::Service>>>>>>>>;

class SessionServiceImpl final : public SessionServiceBase {
 public:
  // None owned; all must outlive the service. `max_inflight_per_stream` >= 1 (see AnsweringStream).
  // `calls` (may be null) counts every call (served_rpc.h). CreateSession calls with memories wait for the one
  // being projected; past `max_opens_waiting` (>= 1) waiting, one is RESOURCE_EXHAUSTED before it reserves or
  // copies anything. Each that waits holds twice its request in the memory budget.
  SessionServiceImpl(SessionStore* store, const Clock* clock, int64_t max_inflight_per_stream,
                     const Authorizer* authorizer, CallCounts* calls, int64_t max_opens_waiting = kMaxOpensWaiting)
      : store_(store),
        clock_(clock),
        max_inflight_per_stream_(std::max<int64_t>(1, max_inflight_per_stream)),
        authorizer_(authorizer),
        calls_(calls),
        max_opens_waiting_(std::max<int64_t>(1, max_opens_waiting)),
        opener_(static_cast<size_t>(max_opens_waiting_), "attn-open") {}

  // The default of max_opens_waiting (config: sessions.max_opens_waiting).
  static constexpr int64_t kMaxOpensWaiting = 64;

  // The open running stops at its next block, those waiting and later ones are answered UNAVAILABLE. For the
  // drain, before gRPC stops: nothing is left to finish a call once it has.
  void StopOpener() { opener_.Stop(); }

  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* ctx,
                                          const attnserve::v1::CreateSessionRequest* request,
                                          attnserve::v1::Session* response) override;
  grpc::ServerUnaryReactor* Append(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* response) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* AppendStream(grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* ForkSession(grpc::CallbackServerContext* ctx,
                                        const attnserve::v1::ForkSessionRequest* request,
                                        attnserve::v1::Session* response) override;
  grpc::ServerUnaryReactor* TruncateSession(grpc::CallbackServerContext* ctx,
                                            const attnserve::v1::TruncateSessionRequest* request,
                                            attnserve::v1::Session* response) override;
  grpc::ServerUnaryReactor* CloseSession(grpc::CallbackServerContext* ctx,
                                         const attnserve::v1::CloseSessionRequest* request,
                                         attnserve::v1::CloseSessionResponse* response) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* ctx,
                                       const attnserve::v1::GetSessionRequest* request,
                                       attnserve::v1::Session* response) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* ctx,
                                         const attnserve::v1::ListSessionsRequest* request,
                                         attnserve::v1::ListSessionsResponse* response) override;

 private:
  // Decodes `request` (which must outlive the call) into an append and hands it to the store; `rpc_name` (a
  // literal) names the method in the access log.
  void SubmitAppend(const ServedRpc& rpc, const char* rpc_name, const attnserve::v1::AppendRequest& request,
                    AppendAnswer* answer, OnAnswer on_answer) const;
  // On the opener's thread: the session opened, its memories projected, `response` filled; the status to finish
  // with (UNAVAILABLE when the drain stopped it; an exception becomes RESOURCE_EXHAUSTED or INTERNAL).
  grpc::Status OpenWithMemories(const SessionStore::OpenArgs& args, attnserve::v1::Session* response) const;
  // Who calls (SessionStore::Caller): its token's digest, and whether it may use every session (no tokens, or an
  // admin token).
  SessionStore::Caller CallerOf(const grpc::ServerContextBase& ctx) const;
  // Why the opener takes no more: UNAVAILABLE once draining, else RESOURCE_EXHAUSTED (max_opens_waiting wait).
  grpc::Status OpenerRefusal() const;

  SessionStore* store_;
  const Clock* clock_;
  const int64_t max_inflight_per_stream_;
  const Authorizer* authorizer_;
  CallCounts* calls_;
  const int64_t max_opens_waiting_;
  // Opens sessions with cross-attention memories, one at a time: projecting a memory is a matmul over up to
  // max_sequence_length rows per layer, which a handler on gRPC's threads must not run (nor a flood of them
  // at once, each with its own OpenMP team).
  SerialWorker opener_;
};

}  // namespace attnserve
