// Unary calls whose request arrives as bytes and is parsed here, not by gRPC (wire_message.h: bytes that are
// not the method's message get INVALID_ARGUMENT). The reactor holds the request and the response; the
// response is serialized when answered. (Not in a protobuf arena: under TSan, libprotobuf 3.21's arena
// crashed when the response was filled on an OpenMP thread, and serving measured no gain from it.)
//
// A handler marked raw (`WithRawCallbackMethod_X`) returns ParseAndSubmit<Req, Resp>(..., submit).
//
// Thread-safety: Answer() once, from any thread; gRPC deletes the reactor when the call is done.
#pragma once

#include <memory>
#include <utility>

#include <grpcpp/grpcpp.h>

#include "server/api/answering_stream.h"
#include "server/api/wire_message.h"
#include "server/runtime/memory_budget.h"
#include "server/transport/delivered_bytes.h"

namespace attnserve {

template <class Request, class Response>
class ParsedUnaryReactor final : public grpc::ServerUnaryReactor {
 public:
  // Parses `wire` (gRPC's; emptied once parsed, so that its bytes are not held twice). nullptr, with
  // `*error` set to INVALID_ARGUMENT, when it is not a Request. `answer` (gRPC's) receives the serialized
  // response and must outlive the call, as gRPC's response buffer does.
  static std::unique_ptr<ParsedUnaryReactor> Parse(const ServedRpc& rpc, const grpc::ByteBuffer* wire,
                                                   grpc::ByteBuffer* answer, grpc::Status* error) {
    std::unique_ptr<ParsedUnaryReactor> reactor(new ParsedUnaryReactor(rpc, answer));
    *error = ParseWire(const_cast<grpc::ByteBuffer*>(wire), &reactor->request_);  // gRPC's own, made non-const
    if (!error->ok()) return nullptr;
    return reactor;
  }

  const Request& request() const { return request_; }
  Response* response() { return &response_; }

  // Finishes the call with `status` (and the response, when OK). `memory`, the call's share of the budget, is
  // held until gRPC is done with the call (its response sent), not just until the response was filled.
  void Answer(const grpc::Status& status, MemoryBudget::Reservation memory) {
    memory_ = std::move(memory);
    if (!status.ok()) {
      Finish(rpc_.Ended(status));
      return;
    }
    grpc::Status serialized = SerializeWire(response_, answer_);
    response_ = Response();  // serialized into `answer_`: not held twice while it is sent
    Finish(rpc_.Ended(serialized.ok() ? status : serialized));
  }

  void OnDone() override { delete this; }

 private:
  ParsedUnaryReactor(const ServedRpc& rpc, grpc::ByteBuffer* answer) : rpc_(rpc), answer_(answer) {}

  const ServedRpc rpc_;
  grpc::ByteBuffer* const answer_;
  Request request_;
  Response response_;
  MemoryBudget::Reservation memory_;
};

// Parses `request` into a Request and calls `submit(const Request&, Response*, OnAnswer)`, whose answer
// finishes the call; or finishes it INVALID_ARGUMENT. Returns the call's reactor, as a raw handler must.
template <class Request, class Response, class SubmitFn>
grpc::ServerUnaryReactor* ParseAndSubmit(const ServedRpc& rpc, const grpc::ByteBuffer* request,
                                         grpc::ByteBuffer* response, SubmitFn submit) {
  DeliveredBytes::Process().Record(rpc.ctx()->peer(), static_cast<int64_t>(request->Length()));
  grpc::Status unparsed;
  auto reactor = ParsedUnaryReactor<Request, Response>::Parse(rpc, request, response, &unparsed);
  if (reactor == nullptr) return FinishNow(rpc, unparsed);
  // Released before submitting: once the answer callback is handed over, only gRPC's OnDone may free it.
  auto* answering = reactor.release();
  submit(answering->request(), answering->response(),
         [answering](const grpc::Status& status, MemoryBudget::Reservation memory) {
           answering->Answer(status, std::move(memory));
         });
  return answering;
}

}  // namespace attnserve
