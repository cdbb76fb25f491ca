#include "server/api/attention_service.h"

#include <chrono>
#include <deque>

#include <spdlog/spdlog.h>

#include "absl/synchronization/mutex.h"
#include "common/log_string.h"
#include "server/api/grpc_status.h"
#include "server/api/infer_request.h"

namespace attnserve {
namespace {

using attnserve::v1::InferRequest;
using attnserve::v1::InferResponse;

// An InferStream refused before its first read (no token, or one without the infer scope).
class RefusedStream final : public grpc::ServerBidiReactor<InferRequest, InferResponse> {
 public:
  explicit RefusedStream(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

grpc::ServerUnaryReactor* FinishNow(grpc::CallbackServerContext* ctx, const grpc::Status& status) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

// A layer as ListLayers and GetLayer show it: the weights file's path only to admins.
void DescribeLayer(const ServedLayer& layer, bool show_paths, attnserve::v1::Layer* out) {
  *out->mutable_config() = layer.config;
  if (!show_paths) out->mutable_config()->clear_weights_path();
  out->set_ready(true);
}

absl::Time DeadlineOf(const grpc::CallbackServerContext& ctx) {
  const auto deadline = ctx.deadline();
  // No deadline is reported as a far-away time point; anything beyond a year counts as none.
  if (deadline - std::chrono::system_clock::now() > std::chrono::hours(24 * 365)) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

}  // namespace

std::unique_ptr<InferenceCall> AttentionServiceImpl::MakeCall(grpc::CallbackServerContext* ctx,
                                                              const InferRequest& request, InferResponse* response,
                                                              OnAnswer on_answer) const {
  auto call = std::make_unique<InferenceCall>();
  call->arrival = clock_->Now();
  call->request_bytes = static_cast<int64_t>(request.ByteSizeLong());
  DecodeInferRequest(request, call.get());
  call->deadline = DeadlineOf(*ctx);
  call->is_cancelled = [ctx] { return ctx->IsCancelled(); };
  call->finish = [self = call.get(), response, on_answer = std::move(on_answer)](const absl::Status& status) {
    absl::Status answer = status;
    if (answer.ok()) {
      try {
        EncodeInferResponse(*self, response);
      } catch (const std::bad_alloc&) {  // a worker must not die of an answer it cannot allocate
        response->Clear();
        answer = absl::ResourceExhaustedError("out of memory while encoding the answer");
      }
    }
    on_answer(ToGrpcStatus(answer), std::move(self->memory));
  };
  return call;
}

// A unary call's reactor: it keeps the call's share of the memory budget until gRPC is done with the call
// (its response sent), not just until the response was filled.
class AttentionServiceImpl::UnaryReactor final : public grpc::ServerUnaryReactor {
 public:
  void Answer(const grpc::Status& status, MemoryBudget::Reservation memory) {
    memory_ = std::move(memory);
    Finish(status);
  }
  void OnDone() override { delete this; }

 private:
  MemoryBudget::Reservation memory_;
};

grpc::ServerUnaryReactor* AttentionServiceImpl::Infer(grpc::CallbackServerContext* ctx, const InferRequest* request,
                                                      InferResponse* response) {
  if (grpc::Status denied = authorizer_->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(ctx, denied);
  auto* reactor = new UnaryReactor();
  dispatcher_->Submit(MakeCall(ctx, *request, response,
                               [reactor](const grpc::Status& status, MemoryBudget::Reservation memory) {
                                 reactor->Answer(status, std::move(memory));
                               }));
  return reactor;
}

// One InferStream: each request read is submitted like a unary one; answers are written back in the order
// they complete (matched by id), one write in flight at a time. The stream finishes once the client has
// closed its side and every request read has been answered and written.
//
// Flow control: at most max_inflight_per_stream requests are read and not yet written back. At that many
// the stream stops reading until a write completes, so HTTP/2 flow control holds the client back, and a
// client that never reads its answers costs at most that many of them.
class AttentionServiceImpl::StreamReactor final : public grpc::ServerBidiReactor<InferRequest, InferResponse> {
 public:
  StreamReactor(AttentionServiceImpl* service, grpc::CallbackServerContext* ctx)
      : service_(service), ctx_(ctx), max_inflight_(service->max_inflight_per_stream_) {
    StartRead(&incoming_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      absl::MutexLock lock(&mu_);
      reads_done_ = true;
      MaybeFinishLocked();
      return;
    }
    auto item = std::make_shared<Item>();
    item->request = std::move(incoming_);
    {
      absl::MutexLock lock(&mu_);
      ++pending_;
    }
    auto call = service_->MakeCall(ctx_, item->request, &item->response,
                                   [this, item](const grpc::Status& status, MemoryBudget::Reservation memory) {
                                     item->memory = std::move(memory);  // released once written
                                     Answered(item, status);
                                   });
    incoming_.Clear();
    service_->dispatcher_->Submit(std::move(call));
    absl::MutexLock lock(&mu_);
    if (InflightLocked() < max_inflight_) {
      StartRead(&incoming_);
    } else {
      read_paused_ = true;  // resumed by OnWriteDone
    }
  }

  void OnWriteDone(bool /*ok*/) override {
    absl::MutexLock lock(&mu_);
    writes_.pop_front();
    if (read_paused_ && InflightLocked() < max_inflight_) {
      read_paused_ = false;
      StartRead(&incoming_);
    }
    if (!writes_.empty()) {
      StartWrite(&writes_.front()->response);
    } else {
      MaybeFinishLocked();
    }
  }

  void OnDone() override { delete this; }

 private:
  struct Item {
    InferRequest request;
    InferResponse response;
    MemoryBudget::Reservation memory;
  };

  void Answered(const std::shared_ptr<Item>& item, const grpc::Status& status) {
    if (!status.ok()) {
      item->response.Clear();
      item->response.set_id(item->request.id());
      item->response.mutable_error()->set_code(static_cast<int32_t>(status.error_code()));
      item->response.mutable_error()->set_message(status.error_message());
    }
    absl::MutexLock lock(&mu_);
    --pending_;
    writes_.push_back(item);
    if (writes_.size() == 1) StartWrite(&writes_.front()->response);
  }

  // Read and not yet written back: computing, or waiting to be written.
  int64_t InflightLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return pending_ + static_cast<int64_t>(writes_.size());
  }

  void MaybeFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (reads_done_ && pending_ == 0 && writes_.empty() && !finished_) {
      finished_ = true;
      Finish(ctx_->IsCancelled() ? grpc::Status::CANCELLED : grpc::Status::OK);
    }
  }

  AttentionServiceImpl* service_;
  grpc::CallbackServerContext* ctx_;
  const int64_t max_inflight_;
  InferRequest incoming_;  // only touched by the read chain, one read at a time
  absl::Mutex mu_;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool read_paused_ ABSL_GUARDED_BY(mu_) = false;  // no read started: max_inflight_ reached
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  int64_t pending_ ABSL_GUARDED_BY(mu_) = 0;                 // submitted, not yet answered
  std::deque<std::shared_ptr<Item>> writes_ ABSL_GUARDED_BY(mu_);  // front is being written
};

grpc::ServerBidiReactor<InferRequest, InferResponse>* AttentionServiceImpl::InferStream(
    grpc::CallbackServerContext* ctx) {
  if (grpc::Status denied = authorizer_->Check(*ctx, kScopeInfer); !denied.ok()) return new RefusedStream(denied);
  return new StreamReactor(this, ctx);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::ListLayers(grpc::CallbackServerContext* ctx,
                                                           const attnserve::v1::ListLayersRequest* /*request*/,
                                                           attnserve::v1::ListLayersResponse* response) {
  if (grpc::Status denied = authorizer_->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(ctx, denied);
  const bool show_paths = authorizer_->MayShowPaths(*ctx);
  for (const auto& layer : registry_->Layers()) DescribeLayer(*layer, show_paths, response->add_layers());
  return FinishNow(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::GetLayer(grpc::CallbackServerContext* ctx,
                                                         const attnserve::v1::GetLayerRequest* request,
                                                         attnserve::v1::Layer* response) {
  if (grpc::Status denied = authorizer_->Check(*ctx, kScopeInfer); !denied.ok()) return FinishNow(ctx, denied);
  const std::shared_ptr<const ServedLayer> layer = registry_->Find(request->name());
  if (layer == nullptr) {
    return FinishNow(ctx, grpc::Status(grpc::StatusCode::NOT_FOUND,
                                       "name: no layer named '" + BoundedForLog(request->name()) + "'"));
  }
  DescribeLayer(*layer, authorizer_->MayShowPaths(*ctx), response);
  return FinishNow(ctx, grpc::Status::OK);
}

}  // namespace attnserve
