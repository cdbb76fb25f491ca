#include "server/api/session_service.h"

#include <memory>
#include <new>
#include <stdexcept>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/api/append_answer.h"
#include "server/api/call_binding.h"
#include "server/api/grpc_status.h"
#include "server/api/infer_request.h"
#include "server/api/parsed_unary.h"
#include "server/api/spliced_wire.h"
#include "server/api/tensor_codec.h"

namespace attnserve {
namespace {

using attnserve::v1::AppendRequest;

constexpr char kSessionHeader[] = "x-attnserve-session";

// The request's session id, or the x-attnserve-session metadata's when the field is empty.
std::string SessionIdOf(const grpc::CallbackServerContext& ctx, const std::string& field) {
  if (!field.empty()) return field;
  auto it = ctx.client_metadata().find(kSessionHeader);
  return it == ctx.client_metadata().end() ? std::string() : std::string(it->second.data(), it->second.size());
}

void EncodeSession(const SessionInfo& info, attnserve::v1::Session* out) {
  out->set_session_id(info.id);
  int64_t tokens = 0, bytes = 0;
  for (const SessionInfo::Layer& l : info.layers) {
    attnserve::v1::SessionLayer* layer = out->add_layers();
    layer->set_layer(l.name);
    layer->set_tokens(l.tokens);
    layer->set_bytes(l.bytes);
    layer->set_cross_attention(l.cross_attention);
    tokens = std::max(tokens, l.tokens);
    bytes += l.bytes;
  }
  out->set_tokens(tokens);
  out->set_bytes(bytes);
  out->set_max_tokens(info.max_tokens);
  out->set_idle_timeout_ms(info.idle_timeout_ms);
  out->set_idle_ms(info.idle_ms);
}

grpc::Status ShuttingDown() { return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down"); }

// The status to finish with, `response` filled when OK.
grpc::Status SessionAnswer(const absl::StatusOr<SessionInfo>& info, attnserve::v1::Session* response) {
  if (!info.ok()) return ToGrpcStatus(info.status());
  EncodeSession(*info, response);
  return grpc::Status::OK;
}

grpc::ServerUnaryReactor* AnswerSession(const ServedRpc& rpc, const absl::StatusOr<SessionInfo>& info,
                                        attnserve::v1::Session* response) {
  return FinishNow(rpc, SessionAnswer(info, response));
}

void WriteError(const AppendRequest& request, const grpc::Status& status, AppendAnswer* answer) {
  answer->message.set_id(request.id());
  answer->message.mutable_error()->set_code(static_cast<int32_t>(status.error_code()));
  answer->message.mutable_error()->set_message(status.error_message());
}

// Cross-attention memories viewed in the request (FLOAT32 [S, kdim] each) into args->memory: what CheckOpen reads.
absl::Status ViewMemories(const attnserve::v1::CreateSessionRequest& request, SessionStore::OpenArgs* args) {
  for (const auto& [layer, tensor] : request.memory()) {
    const std::string field = "memory[" + layer.substr(0, 128) + "]";
    absl::StatusOr<TensorView> view = DecodeTensor(tensor, field, AcceptedDTypes::kFloat32);
    if (!view.ok()) return view.status();
    if (view->shape.size() != 2) {
      return absl::InvalidArgumentError(field + ": expected [S, kdim], got " + ShapeToString(view->shape));
    }
    args->memory[layer] = {static_cast<const float*>(view->data), view->shape[0], view->shape[1]};
  }
  return absl::OkStatus();
}

// args->memory's values copied into `storage` (aligned, for the projection matmuls), and pointed at there.
void CopyMemories(SessionStore::OpenArgs* args, std::vector<std::vector<float>>* storage) {
  for (auto& [layer, memory] : args->memory) {
    std::vector<float>& values = storage->emplace_back(static_cast<size_t>(memory.tokens * memory.dim));
    std::memcpy(values.data(), memory.data, values.size() * sizeof(float));  // the request's bytes: any alignment
    memory.data = values.data();
  }
}

}  // namespace

grpc::ServerUnaryReactor* SessionServiceImpl::CreateSession(grpc::CallbackServerContext* ctx,
                                                            const attnserve::v1::CreateSessionRequest* request,
                                                            attnserve::v1::Session* response) {
  const ServedRpc rpc(ctx, calls_, "/attnserve.v1.SessionService/CreateSession");
  if (grpc::Status denied = authorizer_->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(rpc, denied);
  SessionStore::OpenArgs args;
  args.id = SessionIdOf(*ctx, request->session_id());
  args.layers.assign(request->layers().begin(), request->layers().end());
  args.max_tokens = request->max_tokens();
  args.idle_timeout_ms = request->idle_timeout_ms();
  args.caller = CallerOf(*ctx);
  if (request->memory_size() == 0) return AnswerSession(rpc, store_->Open(args), response);
  if (absl::Status s = ViewMemories(*request, &args); !s.ok()) return FinishNow(rpc, ToGrpcStatus(s));
  // Refused now rather than after the memories before it (the opener checks again: a session may open meanwhile).
  if (absl::Status s = store_->CheckOpen(args); !s.ok()) return FinishNow(rpc, ToGrpcStatus(s));
  if (opener_.full()) return FinishNow(rpc, OpenerRefusal());  // before it holds or copies anything
  // The request and its memories' aligned copy, held until the session is open.
  MemoryBudget::Reservation held;
  if (MemoryBudget* budget = store_->memory_budget(); budget != nullptr) {
    absl::StatusOr<MemoryBudget::Reservation> reserved =
        budget->Reserve(2 * static_cast<int64_t>(request->ByteSizeLong()));
    if (!reserved.ok()) return FinishNow(rpc, ToGrpcStatus(reserved.status()));
    held = std::move(*reserved);
  }
  // Copied here, so that the opener's thread only projects (at most the message limit, a few ms).
  auto memories = std::make_shared<std::vector<std::vector<float>>>();
  CopyMemories(&args, memories.get());
  args.deadline = DeadlineOf(*ctx);
  // The drain stops a running open too, at its next block.
  args.is_cancelled = [ctx, opener = &opener_] { return ctx->IsCancelled() || opener->stopping(); };
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  auto held_until_open = std::make_shared<MemoryBudget::Reservation>(std::move(held));
  auto open = [this, rpc, reactor, response, args = std::move(args), memories, held_until_open](bool run) mutable {
    const grpc::Status status = run ? OpenWithMemories(args, response) : ShuttingDown();
    memories.reset();
    held_until_open->Release();
    reactor->Finish(rpc.Ended(status));
  };
  if (!opener_.Post(std::move(open))) reactor->Finish(rpc.Ended(OpenerRefusal()));
  return reactor;
}

SessionStore::Caller SessionServiceImpl::CallerOf(const grpc::ServerContextBase& ctx) const {
  if (!authorizer_->enabled()) return {};
  return {authorizer_->TokenDigest(ctx), (authorizer_->ScopesOf(ctx.client_metadata()) & kScopeAdmin) != 0};
}

grpc::Status SessionServiceImpl::OpenerRefusal() const {
  if (opener_.stopping()) return ShuttingDown();
  return grpc::Status(
      grpc::StatusCode::RESOURCE_EXHAUSTED,
      absl::StrCat("memory: ", max_opens_waiting_,
                   " sessions with memories are waiting to be opened already (sessions.max_opens_waiting)"));
}

grpc::Status SessionServiceImpl::OpenWithMemories(const SessionStore::OpenArgs& args,
                                                  attnserve::v1::Session* response) const {
  try {  // an exception on the opener's thread would end the process
    absl::StatusOr<SessionInfo> info = store_->Open(args);
    if (!info.ok() && info.status().code() == absl::StatusCode::kCancelled && opener_.stopping()) {
      return ShuttingDown();
    }
    return SessionAnswer(info, response);
  } catch (const std::bad_alloc&) {
    return ToGrpcStatus(absl::ResourceExhaustedError("out of memory while projecting the session's memories"));
  } catch (const std::exception& e) {
    return ToGrpcStatus(absl::InternalError(absl::StrCat("projecting the session's memories failed: ", e.what())));
  }
}

void SessionServiceImpl::SubmitAppend(const ServedRpc& rpc, const char* rpc_name, const AppendRequest& request,
                                      AppendAnswer* answer, OnAnswer on_answer) const {
  auto call = std::make_unique<InferenceCall>();
  BindCall(rpc.ctx(), rpc_name, rpc.trace(), *clock_, static_cast<int64_t>(request.ByteSizeLong()), call.get());
  call->id = request.id();
  call->layer_name = request.layer();
  call->answer_values_in_place = kHostIsLittleEndian;  // EncodeAppendAnswer
  // FLOAT32, BFLOAT16 or FLOAT16 viewed in place: the engine converts 16-bit rows as it gathers them.
  call->decode_status = DecodeActivation(request.query(), "query", &AttentionInputs::query, call.get());
  if (call->decode_status.ok()) {
    absl::StatusOr<DType> output_dtype = DecodeOutputDType(request.output_dtype());
    if (output_dtype.ok()) {
      call->output_dtype = *output_dtype;
    } else {
      call->decode_status = output_dtype.status();
    }
  }
  call->inputs.need_weights = request.need_weights();
  call->inputs.average_attn_weights = !request.has_average_attn_weights() || request.average_attn_weights();
  FinishWith(
      call.get(),
      [self = call.get(), answer] { EncodeAppendAnswer(self, self->session->append.cache->tokens(), answer); },
      std::move(on_answer));
  store_->Append(SessionIdOf(*rpc.ctx(), request.session_id()), request.layer(), std::move(call), CallerOf(*rpc.ctx()));
}

grpc::ServerUnaryReactor* SessionServiceImpl::Append(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                                     grpc::ByteBuffer* response) {
  const ServedRpc rpc(ctx, calls_, "/attnserve.v1.SessionService/Append");
  if (grpc::Status denied = authorizer_->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(rpc, denied);
  return ParseAndSubmit<AppendRequest, AppendAnswer>(
      rpc, request, response, [&](const AppendRequest& parsed, AppendAnswer* answer, OnAnswer on_answer) {
        SubmitAppend(rpc, "Append", parsed, answer, std::move(on_answer));
      });
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* SessionServiceImpl::AppendStream(
    grpc::CallbackServerContext* ctx) {
  const ServedRpc rpc(ctx, calls_, "/attnserve.v1.SessionService/AppendStream");
  if (grpc::Status denied = authorizer_->Check(*ctx, kScopeInfer); !denied.ok()) {
    return new RefusedStream(rpc, denied);
  }
  auto submit = [this, rpc](const AppendRequest& request, AppendAnswer* answer, OnAnswer on_answer) {
    SubmitAppend(rpc, "AppendStream", request, answer, std::move(on_answer));
  };
  return new AnsweringStream<AppendRequest, AppendAnswer>(rpc, max_inflight_per_stream_, submit, WriteError);
}

grpc::ServerUnaryReactor* SessionServiceImpl::ForkSession(grpc::CallbackServerContext* ctx,
                                                          const attnserve::v1::ForkSessionRequest* request,
                                                          attnserve::v1::Session* response) {
  const ServedRpc rpc(ctx, calls_, "/attnserve.v1.SessionService/ForkSession");
  if (grpc::Status denied = authorizer_->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(rpc, denied);
  return AnswerSession(
      rpc, store_->Fork(SessionIdOf(*ctx, request->session_id()), request->new_session_id(), CallerOf(*ctx)), response);
}

grpc::ServerUnaryReactor* SessionServiceImpl::TruncateSession(grpc::CallbackServerContext* ctx,
                                                              const attnserve::v1::TruncateSessionRequest* request,
                                                              attnserve::v1::Session* response) {
  const ServedRpc rpc(ctx, calls_, "/attnserve.v1.SessionService/TruncateSession");
  if (grpc::Status denied = authorizer_->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(rpc, denied);
  return AnswerSession(
      rpc, store_->Truncate(SessionIdOf(*ctx, request->session_id()), request->tokens(), CallerOf(*ctx)), response);
}

grpc::ServerUnaryReactor* SessionServiceImpl::CloseSession(grpc::CallbackServerContext* ctx,
                                                           const attnserve::v1::CloseSessionRequest* request,
                                                           attnserve::v1::CloseSessionResponse* /*response*/) {
  const ServedRpc rpc(ctx, calls_, "/attnserve.v1.SessionService/CloseSession");
  if (grpc::Status denied = authorizer_->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(rpc, denied);
  return FinishNow(rpc, ToGrpcStatus(store_->Close(SessionIdOf(*ctx, request->session_id()), CallerOf(*ctx))));
}

grpc::ServerUnaryReactor* SessionServiceImpl::GetSession(grpc::CallbackServerContext* ctx,
                                                         const attnserve::v1::GetSessionRequest* request,
                                                         attnserve::v1::Session* response) {
  const ServedRpc rpc(ctx, calls_, "/attnserve.v1.SessionService/GetSession");
  if (grpc::Status denied = authorizer_->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(rpc, denied);
  return AnswerSession(rpc, store_->Get(SessionIdOf(*ctx, request->session_id()), CallerOf(*ctx)), response);
}

grpc::ServerUnaryReactor* SessionServiceImpl::ListSessions(grpc::CallbackServerContext* ctx,
                                                           const attnserve::v1::ListSessionsRequest* /*request*/,
                                                           attnserve::v1::ListSessionsResponse* response) {
  const ServedRpc rpc(ctx, calls_, "/attnserve.v1.SessionService/ListSessions");
  if (grpc::Status denied = authorizer_->Check(*ctx, kScopeAdmin); !denied.ok()) return FinishNow(rpc, denied);
  for (const SessionInfo& info : store_->List()) EncodeSession(info, response->add_sessions());
  return FinishNow(rpc, grpc::Status::OK);
}

}  // namespace attnserve
