// attnserve.v1.AttentionService on gRPC's callback API. Handlers never block: Infer validates, queues the
// request on its layer's batcher and returns; the worker that computes the batch finishes the call.
//
// Thread-safety: gRPC calls the handlers from its own threads; workers finish calls from theirs.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "attnserve/v1/attention.grpc.pb.h"
#include "server/batch_executor.h"
#include "server/clock.h"
#include "server/layer_registry.h"
#include "server/metrics.h"

namespace attnserve {

class AttentionServiceImpl final : public attnserve::v1::AttentionService::CallbackService {
 public:
  // None owned; all must outlive the service. `metrics` may be null.
  AttentionServiceImpl(const LayerRegistry* registry, CallScheduler* scheduler, ServerMetrics* metrics,
                       const Clock* clock)
      : registry_(registry), scheduler_(scheduler), metrics_(metrics), clock_(clock) {}

  // From now on new requests get UNAVAILABLE; accepted ones are still answered.
  void StartShutdown() { shutting_down_.store(true); }

  grpc::ServerUnaryReactor* Infer(grpc::CallbackServerContext* ctx, const attnserve::v1::InferRequest* request,
                                  attnserve::v1::InferResponse* response) override;
  grpc::ServerBidiReactor<attnserve::v1::InferRequest, attnserve::v1::InferResponse>* InferStream(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* ListLayers(grpc::CallbackServerContext* ctx,
                                       const attnserve::v1::ListLayersRequest* request,
                                       attnserve::v1::ListLayersResponse* response) override;
  grpc::ServerUnaryReactor* GetLayer(grpc::CallbackServerContext* ctx, const attnserve::v1::GetLayerRequest* request,
                                     attnserve::v1::Layer* response) override;

  // Validates and queues one request; `call->finish` is called exactly once, now (on a rejection) or by
  // the worker. Records the request's metrics and log line when it is answered.
  void Submit(std::unique_ptr<InferenceCall> call);

 private:
  class StreamReactor;

  const LayerRegistry* registry_;
  CallScheduler* scheduler_;
  ServerMetrics* metrics_;
  const Clock* clock_;
  std::atomic<bool> shutting_down_{false};
};

}  // namespace attnserve
