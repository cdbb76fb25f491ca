#include "tools/attnctl_models.h"

#include "client/grpc_status.h"
#include "inference/grpc_service.grpc.pb.h"

namespace attnserve {

absl::Status LoadModel(const Client& client, const std::string& name, const std::string& config_json,
                       std::optional<int64_t> timeout_ms) {
  auto stub = inference::GRPCInferenceService::NewStub(client.channel());
  inference::RepositoryModelLoadRequest request;
  request.set_model_name(name);
  if (!config_json.empty()) (*request.mutable_parameters())["config"].set_string_param(config_json);
  inference::RepositoryModelLoadResponse response;
  grpc::ClientContext context;
  client.PrepareContext(&context, timeout_ms);
  return FromGrpcStatus(stub->RepositoryModelLoad(&context, request, &response), context);
}

absl::Status UnloadModel(const Client& client, const std::string& name, std::optional<int64_t> timeout_ms) {
  auto stub = inference::GRPCInferenceService::NewStub(client.channel());
  inference::RepositoryModelUnloadRequest request;
  request.set_model_name(name);
  inference::RepositoryModelUnloadResponse response;
  grpc::ClientContext context;
  client.PrepareContext(&context, timeout_ms);
  return FromGrpcStatus(stub->RepositoryModelUnload(&context, request, &response), context);
}

absl::StatusOr<std::vector<LayerVersionInfo>> ListModelVersions(const Client& client,
                                                                std::optional<int64_t> timeout_ms) {
  auto stub = inference::GRPCInferenceService::NewStub(client.channel());
  inference::RepositoryIndexResponse response;
  grpc::ClientContext context;
  client.PrepareContext(&context, timeout_ms);
  const grpc::Status status = stub->RepositoryIndex(&context, inference::RepositoryIndexRequest(), &response);
  if (!status.ok()) return FromGrpcStatus(status, context);
  std::vector<LayerVersionInfo> out;
  for (const auto& m : response.models()) out.push_back({m.name(), m.version(), m.state(), m.reason()});
  return out;
}

}  // namespace attnserve
