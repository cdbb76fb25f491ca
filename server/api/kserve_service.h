// The Open Inference Protocol (KServe v2, inference.GRPCInferenceService) on gRPC's callback API, beside
// attnserve.v1 on the same port: each layer is a model. ModelInfer and ModelStreamInfer go through the same
// Dispatcher, batcher and engine as attnserve.v1's Infer (kserve_request.h decodes and encodes); the
// repository RPCs drive the LayerCatalog on a control thread, so that no gRPC thread waits for a load.
//
// Access: ServerLive and ServerReady are health checks, open to all; inference and metadata need the infer
// scope; RepositoryModelLoad / Unload need the admin scope, and without tokens security.enable_model_control.
//
// Thread-safety: gRPC calls the handlers from its own threads; workers finish calls from theirs.
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "core/tensor.h"
#include "inference/grpc_service.grpc.pb.h"
#include "server/api/answering_stream.h"
#include "server/api/authorizer.h"
#include "server/api/call_counts.h"
#include "server/api/served_rpc.h"
#include "server/batching/clock.h"
#include "server/observability/layer_statistics.h"
#include "server/runtime/dispatcher.h"
#include "server/runtime/layer_catalog.h"
#include "server/runtime/layer_registry.h"
#include "server/runtime/serial_worker.h"

namespace attnserve {

// gRPC's CallbackService with ModelInfer and ModelStreamInfer raw: their requests are parsed here
// (parsed_unary.h, answering_stream.h), so that bytes that are not a ModelInferRequest get INVALID_ARGUMENT.
// Every method is a callback method (a synchronous one would need gRPC's thread pool).
namespace kserve_internal {
using G = inference::GRPCInferenceService;
using Service = G::WithCallbackMethod_ServerLive<G::WithCallbackMethod_ServerReady<G::WithCallbackMethod_ModelReady<
    G::WithCallbackMethod_ServerMetadata<G::WithCallbackMethod_ModelMetadata<G::WithRawCallbackMethod_ModelInfer<
        G::WithRawCallbackMethod_ModelStreamInfer<G::WithCallbackMethod_ModelConfig<
            G::WithCallbackMethod_ModelStatistics<G::WithCallbackMethod_RepositoryIndex<
                G::WithCallbackMethod_RepositoryModelLoad<G::WithCallbackMethod_RepositoryModelUnload<
                    G::Service>>>>>>>>>>>>;
}  // namespace kserve_internal
using KServeServiceBase = kserve_internal::Service;

class KServeServiceImpl final : public KServeServiceBase {
 public:
  struct Options {
    // None owned; all required, and must outlive the service.
    const LayerRegistry* registry = nullptr;
    Dispatcher* dispatcher = nullptr;
    const Clock* clock = nullptr;
    const Authorizer* authorizer = nullptr;
    LayerCatalog* catalog = nullptr;
    LayerStatistics* statistics = nullptr;
    // Requests a ModelStreamInfer holds read and not yet written back (AnsweringStream); >= 1.
    int64_t max_inflight_per_stream = 64;
    // security.enable_model_control: load and unload without tokens.
    bool model_control_without_tokens = false;
    // Counts every call (served_rpc.h); optional, must outlive the service.
    CallCounts* calls = nullptr;
  };
  // InvalidArgument for a missing dependency.
  static absl::StatusOr<std::unique_ptr<KServeServiceImpl>> Create(const Options& options);

  grpc::ServerUnaryReactor* ServerLive(grpc::CallbackServerContext* ctx, const inference::ServerLiveRequest* request,
                                       inference::ServerLiveResponse* response) override;
  grpc::ServerUnaryReactor* ServerReady(grpc::CallbackServerContext* ctx, const inference::ServerReadyRequest* request,
                                        inference::ServerReadyResponse* response) override;
  grpc::ServerUnaryReactor* ModelReady(grpc::CallbackServerContext* ctx, const inference::ModelReadyRequest* request,
                                       inference::ModelReadyResponse* response) override;
  grpc::ServerUnaryReactor* ServerMetadata(grpc::CallbackServerContext* ctx,
                                           const inference::ServerMetadataRequest* request,
                                           inference::ServerMetadataResponse* response) override;
  grpc::ServerUnaryReactor* ModelMetadata(grpc::CallbackServerContext* ctx,
                                          const inference::ModelMetadataRequest* request,
                                          inference::ModelMetadataResponse* response) override;
  grpc::ServerUnaryReactor* ModelConfig(grpc::CallbackServerContext* ctx, const inference::ModelConfigRequest* request,
                                        inference::ModelConfigResponse* response) override;
  grpc::ServerUnaryReactor* ModelStatistics(grpc::CallbackServerContext* ctx,
                                            const inference::ModelStatisticsRequest* request,
                                            inference::ModelStatisticsResponse* response) override;
  grpc::ServerUnaryReactor* ModelInfer(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* ModelStreamInfer(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* RepositoryIndex(grpc::CallbackServerContext* ctx,
                                            const inference::RepositoryIndexRequest* request,
                                            inference::RepositoryIndexResponse* response) override;
  grpc::ServerUnaryReactor* RepositoryModelLoad(grpc::CallbackServerContext* ctx,
                                                const inference::RepositoryModelLoadRequest* request,
                                                inference::RepositoryModelLoadResponse* response) override;
  grpc::ServerUnaryReactor* RepositoryModelUnload(grpc::CallbackServerContext* ctx,
                                                  const inference::RepositoryModelUnloadRequest* request,
                                                  inference::RepositoryModelUnloadResponse* response) override;

  // Lets the running change finish and stops the control thread: changes waiting and later ones are refused
  // UNAVAILABLE. Any thread but the control thread, handlers running or not; before what the loads use goes
  // away. Idempotent.
  void StopControlThread();

 private:
  explicit KServeServiceImpl(const Options& options)
      : options_(options), control_(/*max_pending=*/16, "attn-control") {}
  // `rpc_name` (a literal) names the method in the access log. The answer fills `response` and `raw_outputs`
  // (EncodeModelInferAnswer); both must outlive the call.
  void Submit(const ServedRpc& rpc, const char* rpc_name, const inference::ModelInferRequest& request,
              inference::ModelInferResponse* response, std::vector<Tensor>* raw_outputs, OnAnswer on_answer) const;
  grpc::Status CheckModelControl(const grpc::CallbackServerContext& ctx) const;
  // The layer a metadata request names at the version it asks for; NOT_FOUND / INVALID_ARGUMENT otherwise.
  absl::StatusOr<std::shared_ptr<const ServedLayer>> FindModel(const std::string& name,
                                                               const std::string& version) const;
  // Runs `work` on the control thread and finishes the call with its status (RESOURCE_EXHAUSTED when 16
  // changes wait already).
  grpc::ServerUnaryReactor* RunOnControlThread(const ServedRpc& rpc, std::function<absl::Status()> work);

  const Options options_;
  SerialWorker control_;
};

}  // namespace attnserve
