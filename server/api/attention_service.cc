#include "server/api/attention_service.h"

#include <memory>
#include <utility>

#include "common/log_string.h"
#include "server/api/call_binding.h"
#include "server/api/infer_request.h"
#include "server/api/parsed_unary.h"

namespace attnserve {
namespace {

using attnserve::v1::InferRequest;
using attnserve::v1::InferResponse;

// A layer as ListLayers and GetLayer show it: the weights file's path only to admins.
void DescribeLayer(const ServedLayer& layer, bool show_paths, attnserve::v1::Layer* out) {
  *out->mutable_config() = layer.config;
  if (!show_paths) out->mutable_config()->clear_weights_path();
  out->set_ready(true);
}

void WriteError(const InferRequest& request, const grpc::Status& status, InferAnswer* answer) {
  InferResponse* response = &answer->message;
  response->set_id(request.id());
  response->mutable_error()->set_code(static_cast<int32_t>(status.error_code()));
  response->mutable_error()->set_message(status.error_message());
}

}  // namespace

void AttentionServiceImpl::Submit(const ServedRpc& rpc, const char* rpc_name, const InferRequest& request,
                                  InferAnswer* answer, OnAnswer on_answer) const {
  auto call = std::make_unique<InferenceCall>();
  BindCall(rpc.ctx(), rpc_name, rpc.trace(), *clock_, static_cast<int64_t>(request.ByteSizeLong()), call.get());
  DecodeInferRequest(request, call.get());
  FinishWith(
      call.get(), [self = call.get(), answer] { EncodeInferAnswer(self, answer); }, std::move(on_answer));
  dispatcher_->Submit(std::move(call));
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Infer(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                                      grpc::ByteBuffer* response) {
  const ServedRpc rpc(ctx, calls_, "/attnserve.v1.AttentionService/Infer");
  if (grpc::Status denied = authorizer_->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(rpc, denied);
  return ParseAndSubmit<InferRequest, InferAnswer>(
      rpc, request, response, [&](const InferRequest& parsed, InferAnswer* answer, OnAnswer on_answer) {
        Submit(rpc, "Infer", parsed, answer, std::move(on_answer));
      });
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* AttentionServiceImpl::InferStream(
    grpc::CallbackServerContext* ctx) {
  const ServedRpc rpc(ctx, calls_, "/attnserve.v1.AttentionService/InferStream");
  if (grpc::Status denied = authorizer_->Check(*ctx, kScopeInfer); !denied.ok()) {
    return new RefusedStream(rpc, denied);
  }
  auto submit = [this, rpc](const InferRequest& request, InferAnswer* answer, OnAnswer on_answer) {
    Submit(rpc, "InferStream", request, answer, std::move(on_answer));
  };
  return new AnsweringStream<InferRequest, InferAnswer>(rpc, max_inflight_per_stream_, submit, WriteError);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::ListLayers(grpc::CallbackServerContext* ctx,
                                                           const attnserve::v1::ListLayersRequest* /*request*/,
                                                           attnserve::v1::ListLayersResponse* response) {
  const ServedRpc rpc(ctx, calls_, "/attnserve.v1.AttentionService/ListLayers");
  if (grpc::Status denied = authorizer_->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(rpc, denied);
  const bool show_paths = authorizer_->MayShowPaths(*ctx);
  for (const auto& layer : registry_->Layers()) DescribeLayer(*layer, show_paths, response->add_layers());
  return FinishNow(rpc, grpc::Status::OK);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::GetLayer(grpc::CallbackServerContext* ctx,
                                                         const attnserve::v1::GetLayerRequest* request,
                                                         attnserve::v1::Layer* response) {
  const ServedRpc rpc(ctx, calls_, "/attnserve.v1.AttentionService/GetLayer");
  if (grpc::Status denied = authorizer_->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(rpc, denied);
  const std::shared_ptr<const ServedLayer> layer = registry_->Find(request->name());
  if (layer == nullptr) {
    return FinishNow(rpc, grpc::Status(grpc::StatusCode::NOT_FOUND,
                                       "name: no layer named '" + BoundedForLog(request->name()) + "'"));
  }
  DescribeLayer(*layer, authorizer_->MayShowPaths(*ctx), response);
  return FinishNow(rpc, grpc::Status::OK);
}

}  // namespace attnserve
