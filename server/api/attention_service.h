// attnserve.v1.AttentionService on gRPC's callback API. Handlers never block: Infer decodes the request
// into an InferenceCall and hands it to the Dispatcher (validate, admit, queue); the worker that computes
// the batch finishes the call, and its `finish` encodes the response here (call_binding.h). InferStream is
// an AnsweringStream.
//
// Thread-safety: gRPC calls the handlers from its own threads; workers finish calls from theirs.
#pragma once

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <string>

#include "attnserve/v1/attention.grpc.pb.h"
#include "server/api/answering_stream.h"
#include "server/api/authorizer.h"
#include "server/api/call_counts.h"
#include "server/api/infer_answer.h"
#include "server/api/served_rpc.h"
#include "server/batching/clock.h"
#include "server/runtime/dispatcher.h"
#include "server/runtime/layer_registry.h"

namespace attnserve {

// gRPC's CallbackService with Infer and InferStream raw: their requests are parsed here (parsed_unary.h,
// answering_stream.h), so that bytes that are not an InferRequest get INVALID_ARGUMENT. Every method is a
// callback method (a synchronous one would need gRPC's thread pool).
using AttentionServiceBase = attnserve::v1::AttentionService::WithRawCallbackMethod_Infer<
    attnserve::v1::AttentionService::WithRawCallbackMethod_InferStream<
        attnserve::v1::AttentionService::WithCallbackMethod_ListLayers<
            attnserve::v1::AttentionService::WithCallbackMethod_GetLayer<attnserve::v1::AttentionService::Service>>>>;

class AttentionServiceImpl final : public AttentionServiceBase {
 public:
  // None owned; all must outlive the service. `max_inflight_per_stream` >= 1: requests an InferStream
  // holds read and not yet written back (see AnsweringStream). Every RPC needs the infer scope of
  // `authorizer`; layer info shows weights paths only to admin tokens. `calls` (may be null) counts every
  // call (served_rpc.h).
  AttentionServiceImpl(const LayerRegistry* registry, Dispatcher* dispatcher, const Clock* clock,
                       int64_t max_inflight_per_stream, const Authorizer* authorizer, CallCounts* calls)
      : registry_(registry),
        dispatcher_(dispatcher),
        clock_(clock),
        max_inflight_per_stream_(std::max<int64_t>(1, max_inflight_per_stream)),
        authorizer_(authorizer),
        calls_(calls) {}

  grpc::ServerUnaryReactor* Infer(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                  grpc::ByteBuffer* response) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* InferStream(grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* ListLayers(grpc::CallbackServerContext* ctx,
                                       const attnserve::v1::ListLayersRequest* request,
                                       attnserve::v1::ListLayersResponse* response) override;
  grpc::ServerUnaryReactor* GetLayer(grpc::CallbackServerContext* ctx, const attnserve::v1::GetLayerRequest* request,
                                     attnserve::v1::Layer* response) override;

 private:
  // Decodes `request` (which must outlive the call) into a call and submits it; `on_answer` gets its answer,
  // encoded into `answer`. `rpc` (a literal) names the method in the access log.
  void Submit(const ServedRpc& rpc, const char* rpc_name, const attnserve::v1::InferRequest& request,
              InferAnswer* answer, OnAnswer on_answer) const;

  const LayerRegistry* registry_;
  Dispatcher* dispatcher_;
  const Clock* clock_;
  const int64_t max_inflight_per_stream_;
  const Authorizer* authorizer_;
  CallCounts* calls_;
};

}  // namespace attnserve
