#include "server/api/kserve_service.h"

#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <exception>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log_string.h"
#include "common/status_macros.h"
#include "common/version.h"
#include "server/api/call_binding.h"
#include "server/api/grpc_status.h"
#include "server/api/kserve_answer.h"
#include "server/api/kserve_metadata.h"
#include "server/api/kserve_request.h"
#include "server/api/parsed_unary.h"

namespace attnserve {
namespace {

using inference::ModelInferRequest;
using inference::ModelInferResponse;
using inference::ModelStreamInferResponse;

// The protocol extensions implemented (ServerMetadata.extensions).
constexpr const char* kExtensions[] = {"model_repository", "model_configuration", "statistics"};

absl::StatusOr<int64_t> ParseVersion(const std::string& version) {
  if (version.empty()) return 0;
  int64_t v = 0;
  if (!absl::SimpleAtoi(version, &v) || v <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("version: expected a positive integer, got '", BoundedForLog(version, 32), "'"));
  }
  return v;
}

// `recorded` plus a zero entry for every serving version (matching `name` and `version` when set) that has
// answered nothing yet, ordered by name and version: every model appears, as the protocol expects.
std::vector<VersionStatistics> WithServingVersions(std::vector<VersionStatistics> recorded,
                                                   const LayerRegistry& registry, const std::string& name,
                                                   int64_t version) {
  std::map<std::pair<std::string, int64_t>, VersionStatistics> all;
  for (VersionStatistics& s : recorded) all[{s.layer, s.version}] = std::move(s);
  for (const auto& layer : registry.Layers()) {
    const std::string& layer_name = layer->config.name();
    if ((!name.empty() && layer_name != name) || (version != 0 && layer->version != version)) continue;
    VersionStatistics& entry = all[{layer_name, layer->version}];
    entry.layer = layer_name;
    entry.version = layer->version;
  }
  std::vector<VersionStatistics> out;
  for (auto& [key, s] : all) out.push_back(std::move(s));
  return out;
}

void WriteStreamError(const ModelInferRequest& request, const grpc::Status& status, KServeStreamAnswer* answer) {
  ModelStreamInferResponse* response = &answer->message;
  response->set_error_message(absl::StrCat(absl::StatusCodeToString(static_cast<absl::StatusCode>(
                                               status.error_code())),
                                           ": ", status.error_message()));
  response->mutable_infer_response()->set_id(request.id());
  response->mutable_infer_response()->set_model_name(BoundedForLog(request.model_name()));
}

// The "config" parameter of RepositoryModelLoad: a LayerConfig in JSON.
absl::StatusOr<std::unique_ptr<attnserve::v1::LayerConfig>> ConfigParameter(
    const inference::RepositoryModelLoadRequest& request) {
  for (const auto& [name, value] : request.parameters()) {
    if (name != "config") {
      return absl::InvalidArgumentError(absl::StrCat("parameters: unsupported parameter '", BoundedForLog(name),
                                                     "' (attnserve takes \"config\": a LayerConfig in JSON)"));
    }
    if (value.parameter_choice_case() != inference::ModelRepositoryParameter::kStringParam) {
      return absl::InvalidArgumentError("parameters.config: expected a string_param holding JSON");
    }
  }
  const auto it = request.parameters().find("config");
  if (it == request.parameters().end()) return nullptr;
  auto config = std::make_unique<attnserve::v1::LayerConfig>();
  const auto parsed = google::protobuf::util::JsonStringToMessage(it->second.string_param(), config.get());
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("parameters.config: not a LayerConfig in JSON: ", BoundedForLog(parsed.message().ToString())));
  }
  return config;
}

}  // namespace

absl::StatusOr<std::unique_ptr<KServeServiceImpl>> KServeServiceImpl::Create(const Options& options) {
  if (options.registry == nullptr || options.dispatcher == nullptr || options.clock == nullptr ||
      options.authorizer == nullptr || options.catalog == nullptr || options.statistics == nullptr) {
    return absl::InvalidArgumentError("KServeServiceImpl: every dependency is required");
  }
  Options checked = options;
  checked.max_inflight_per_stream = std::max<int64_t>(1, options.max_inflight_per_stream);
  return std::unique_ptr<KServeServiceImpl>(new KServeServiceImpl(checked));
}

grpc::Status KServeServiceImpl::CheckModelControl(const grpc::CallbackServerContext& ctx) const {
  if (options_.authorizer->enabled()) return options_.authorizer->Check(ctx, kScopeAdmin);
  if (options_.model_control_without_tokens) return grpc::Status::OK;
  return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                      "model control is off: start attnserve with --enable-model-control, or use an admin token");
}

absl::StatusOr<std::shared_ptr<const ServedLayer>> KServeServiceImpl::FindModel(const std::string& name,
                                                                                const std::string& version) const {
  std::shared_ptr<const ServedLayer> layer = options_.registry->Find(name);
  if (layer == nullptr) {
    return absl::NotFoundError(absl::StrCat("name: no model named '", BoundedForLog(name), "'"));
  }
  ATTN_ASSIGN_OR_RETURN(const int64_t wanted, ParseVersion(version));
  if (wanted == 0 || wanted == layer->version) return layer;
  layer = options_.registry->Find(name, wanted);
  if (layer == nullptr) {
    return absl::NotFoundError(absl::StrCat("version: model '", BoundedForLog(name), "' has version(s) ",
                                            absl::StrJoin(options_.registry->Versions(name), ", "), ", not ", wanted));
  }
  return layer;
}

grpc::ServerUnaryReactor* KServeServiceImpl::ServerLive(grpc::CallbackServerContext* ctx,
                                                        const inference::ServerLiveRequest* /*request*/,
                                                        inference::ServerLiveResponse* response) {
  const ServedRpc rpc(ctx, options_.calls, "/inference.GRPCInferenceService/ServerLive");
  response->set_live(true);
  return FinishNow(rpc, grpc::Status::OK);
}

grpc::ServerUnaryReactor* KServeServiceImpl::ServerReady(grpc::CallbackServerContext* ctx,
                                                         const inference::ServerReadyRequest* /*request*/,
                                                         inference::ServerReadyResponse* response) {
  const ServedRpc rpc(ctx, options_.calls, "/inference.GRPCInferenceService/ServerReady");
  response->set_ready(!options_.dispatcher->shutting_down() && !options_.registry->Layers().empty());
  return FinishNow(rpc, grpc::Status::OK);
}

grpc::ServerUnaryReactor* KServeServiceImpl::ModelReady(grpc::CallbackServerContext* ctx,
                                                        const inference::ModelReadyRequest* request,
                                                        inference::ModelReadyResponse* response) {
  const ServedRpc rpc(ctx, options_.calls, "/inference.GRPCInferenceService/ModelReady");
  if (grpc::Status denied = options_.authorizer->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(rpc, denied);
  const auto layer = FindModel(request->name(), request->version());
  if (!layer.ok() && layer.status().code() == absl::StatusCode::kInvalidArgument) {
    return FinishNow(rpc, ToGrpcStatus(layer.status()));
  }
  response->set_ready(layer.ok() && !options_.dispatcher->shutting_down());
  return FinishNow(rpc, grpc::Status::OK);
}

grpc::ServerUnaryReactor* KServeServiceImpl::ServerMetadata(grpc::CallbackServerContext* ctx,
                                                            const inference::ServerMetadataRequest* /*request*/,
                                                            inference::ServerMetadataResponse* response) {
  const ServedRpc rpc(ctx, options_.calls, "/inference.GRPCInferenceService/ServerMetadata");
  if (grpc::Status denied = options_.authorizer->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(rpc, denied);
  response->set_name("attnserve");
  response->set_version(kAttnserveVersion);
  for (const char* extension : kExtensions) response->add_extensions(extension);
  return FinishNow(rpc, grpc::Status::OK);
}

grpc::ServerUnaryReactor* KServeServiceImpl::ModelMetadata(grpc::CallbackServerContext* ctx,
                                                           const inference::ModelMetadataRequest* request,
                                                           inference::ModelMetadataResponse* response) {
  const ServedRpc rpc(ctx, options_.calls, "/inference.GRPCInferenceService/ModelMetadata");
  if (grpc::Status denied = options_.authorizer->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(rpc, denied);
  const auto layer = FindModel(request->name(), request->version());
  if (!layer.ok()) return FinishNow(rpc, ToGrpcStatus(layer.status()));
  DescribeModelMetadata(**layer, options_.registry->Versions(request->name()), response);
  return FinishNow(rpc, grpc::Status::OK);
}

grpc::ServerUnaryReactor* KServeServiceImpl::ModelConfig(grpc::CallbackServerContext* ctx,
                                                         const inference::ModelConfigRequest* request,
                                                         inference::ModelConfigResponse* response) {
  const ServedRpc rpc(ctx, options_.calls, "/inference.GRPCInferenceService/ModelConfig");
  if (grpc::Status denied = options_.authorizer->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(rpc, denied);
  const auto layer = FindModel(request->name(), request->version());
  if (!layer.ok()) return FinishNow(rpc, ToGrpcStatus(layer.status()));
  DescribeModelConfig(**layer, response->mutable_config());
  return FinishNow(rpc, grpc::Status::OK);
}

grpc::ServerUnaryReactor* KServeServiceImpl::ModelStatistics(grpc::CallbackServerContext* ctx,
                                                             const inference::ModelStatisticsRequest* request,
                                                             inference::ModelStatisticsResponse* response) {
  const ServedRpc rpc(ctx, options_.calls, "/inference.GRPCInferenceService/ModelStatistics");
  if (grpc::Status denied = options_.authorizer->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(rpc, denied);
  const absl::StatusOr<int64_t> version = ParseVersion(request->version());
  if (!version.ok()) return FinishNow(rpc, ToGrpcStatus(version.status()));
  const std::vector<VersionStatistics> stats = WithServingVersions(
      options_.statistics->Snapshot(request->name(), *version), *options_.registry, request->name(), *version);
  if (!request->name().empty() && stats.empty()) {
    return FinishNow(rpc, grpc::Status(grpc::StatusCode::NOT_FOUND,
                                       "name: no model named '" + BoundedForLog(request->name()) + "'"));
  }
  for (const VersionStatistics& s : stats) DescribeModelStatistics(s, response->add_model_stats());
  return FinishNow(rpc, grpc::Status::OK);
}

void KServeServiceImpl::Submit(const ServedRpc& rpc, const char* rpc_name, const ModelInferRequest& request,
                               ModelInferResponse* response, std::vector<Tensor>* raw_outputs,
                               OnAnswer on_answer) const {
  auto call = std::make_unique<InferenceCall>();
  BindCall(rpc.ctx(), rpc_name, rpc.trace(), *options_.clock, static_cast<int64_t>(request.ByteSizeLong()), call.get());
  DecodeModelInferRequest(request, call.get());
  FinishWith(
      call.get(),
      [self = call.get(), &request, response, raw_outputs] {
        EncodeModelInferAnswer(self, request, response, raw_outputs);
      },
      std::move(on_answer));
  options_.dispatcher->Submit(std::move(call));
}

grpc::ServerUnaryReactor* KServeServiceImpl::ModelInfer(grpc::CallbackServerContext* ctx,
                                                        const grpc::ByteBuffer* request, grpc::ByteBuffer* response) {
  const ServedRpc rpc(ctx, options_.calls, "/inference.GRPCInferenceService/ModelInfer");
  if (grpc::Status denied = options_.authorizer->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(rpc, denied);
  return ParseAndSubmit<ModelInferRequest, KServeAnswer>(
      rpc, request, response, [&](const ModelInferRequest& parsed, KServeAnswer* answer, OnAnswer on_answer) {
        Submit(rpc, "ModelInfer", parsed, &answer->message, &answer->raw_outputs, std::move(on_answer));
      });
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* KServeServiceImpl::ModelStreamInfer(
    grpc::CallbackServerContext* ctx) {
  const ServedRpc rpc(ctx, options_.calls, "/inference.GRPCInferenceService/ModelStreamInfer");
  if (grpc::Status denied = options_.authorizer->Check(*ctx, kScopeInfer); !denied.ok()) {
    return new RefusedStream(rpc, denied);
  }
  auto submit = [this, rpc](const ModelInferRequest& request, KServeStreamAnswer* answer, OnAnswer on_answer) {
    Submit(rpc, "ModelStreamInfer", request, answer->message.mutable_infer_response(), &answer->raw_outputs,
           std::move(on_answer));
  };
  return new AnsweringStream<ModelInferRequest, KServeStreamAnswer>(rpc, options_.max_inflight_per_stream, submit,
                                                                    WriteStreamError);
}

grpc::ServerUnaryReactor* KServeServiceImpl::RepositoryIndex(grpc::CallbackServerContext* ctx,
                                                             const inference::RepositoryIndexRequest* request,
                                                             inference::RepositoryIndexResponse* response) {
  const ServedRpc rpc(ctx, options_.calls, "/inference.GRPCInferenceService/RepositoryIndex");
  if (grpc::Status denied = options_.authorizer->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(rpc, denied);
  // A failed load's reason may name weights files: like layer info's paths, for those who may change layers.
  const bool show_reasons = options_.authorizer->MayShowPaths(*ctx) ||
                            (!options_.authorizer->enabled() && options_.model_control_without_tokens);
  for (const LayerStatus& layer : options_.catalog->Index()) {
    if (request->ready() && layer.state != LayerState::kReady) continue;
    auto* model = response->add_models();
    model->set_name(layer.name);
    if (layer.version > 0) model->set_version(absl::StrCat(layer.version));
    model->set_state(LayerStateName(layer.state));
    const bool plain = layer.reason == "unloaded" || layer.reason == "removed from the config file";
    model->set_reason(show_reasons || plain || layer.reason.empty() ? layer.reason
                                                                    : "the last load failed (the reason: admins only)");
  }
  return FinishNow(rpc, grpc::Status::OK);
}

grpc::ServerUnaryReactor* KServeServiceImpl::RunOnControlThread(const ServedRpc& rpc,
                                                                std::function<absl::Status()> work) {
  grpc::ServerUnaryReactor* reactor = rpc.ctx()->DefaultReactor();
  const bool posted = control_.Post([rpc, reactor, work = std::move(work)](bool run) {
    if (!run) {
      return reactor->Finish(rpc.Ended(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down")));
    }
    absl::Status status;
    try {  // an exception on the control thread would end the process
      status = work();
    } catch (const std::bad_alloc&) {
      status = absl::ResourceExhaustedError("out of memory while changing the layer");
    } catch (const std::exception& e) {
      status = absl::InternalError(absl::StrCat("changing the layer failed: ", e.what()));
    }
    reactor->Finish(rpc.Ended(ToGrpcStatus(status)));
  });
  if (!posted) {
    reactor->Finish(
        rpc.Ended(control_.stopping()
                      ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down")
                      : grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "16 layer changes are waiting already")));
  }
  return reactor;
}

void KServeServiceImpl::StopControlThread() { control_.Stop(); }

grpc::ServerUnaryReactor* KServeServiceImpl::RepositoryModelLoad(grpc::CallbackServerContext* ctx,
                                                                 const inference::RepositoryModelLoadRequest* request,
                                                                 inference::RepositoryModelLoadResponse* /*response*/) {
  const ServedRpc rpc(ctx, options_.calls, "/inference.GRPCInferenceService/RepositoryModelLoad");
  if (grpc::Status denied = CheckModelControl(*ctx); !denied.ok()) return FinishNow(rpc, denied);
  absl::StatusOr<std::unique_ptr<attnserve::v1::LayerConfig>> config = ConfigParameter(*request);
  if (!config.ok()) return FinishNow(rpc, ToGrpcStatus(config.status()));
  std::shared_ptr<attnserve::v1::LayerConfig> override_config = std::move(*config);
  return RunOnControlThread(rpc, [catalog = options_.catalog, name = request->model_name(), override_config] {
    return catalog->Load(name, override_config.get());
  });
}

grpc::ServerUnaryReactor* KServeServiceImpl::RepositoryModelUnload(
    grpc::CallbackServerContext* ctx, const inference::RepositoryModelUnloadRequest* request,
    inference::RepositoryModelUnloadResponse* /*response*/) {
  const ServedRpc rpc(ctx, options_.calls, "/inference.GRPCInferenceService/RepositoryModelUnload");
  if (grpc::Status denied = CheckModelControl(*ctx); !denied.ok()) return FinishNow(rpc, denied);
  return RunOnControlThread(rpc, [catalog = options_.catalog, name = request->model_name()] {
    return catalog->Unload(name);
  });
}

}  // namespace attnserve
