#include "server/batch_executor.h"

#include "absl/strings/str_cat.h"
#include "server/grpc_status.h"
#include "server/tensor_codec.h"

namespace attnserve {

void BatchExecutor::Run(const std::string& layer_name, std::vector<CallScheduler::Entry> batch) const {
  const absl::Time start = clock_->Now();
  std::vector<std::unique_ptr<InferenceCall>> runnable;
  runnable.reserve(batch.size());
  for (CallScheduler::Entry& entry : batch) {
    std::unique_ptr<InferenceCall>& call = entry.item;
    // The deadline first: once it passes gRPC cancels the call too, and it is the deadline that ended it.
    if (call->deadline <= start) {
      call->finish(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                absl::StrCat("deadline passed while queued (waited ",
                                             absl::ToInt64Microseconds(start - call->arrival), " us)")));
    } else if (call->is_cancelled && call->is_cancelled()) {
      call->finish(grpc::Status(grpc::StatusCode::CANCELLED, "request cancelled while queued"));
    } else {
      runnable.push_back(std::move(call));
    }
  }
  if (runnable.empty()) return;

  std::vector<const AttentionInputs*> inputs;
  int64_t tokens = 0;
  double flops = 0;
  for (const auto& call : runnable) {
    inputs.push_back(&call->inputs);
    tokens += call->query_tokens;
    flops += static_cast<double>(call->flops);
    if (metrics_) metrics_->QueueWait(layer_name, absl::ToDoubleSeconds(start - call->arrival));
  }
  const MultiheadAttention& engine = *runnable.front()->layer->engine;
  std::vector<absl::StatusOr<AttentionOutputs>> results = engine.ForwardBatch(inputs);
  const absl::Duration compute = clock_->Now() - start;
  if (metrics_) {
    metrics_->BatchDone(layer_name, static_cast<int>(runnable.size()), tokens, absl::ToDoubleSeconds(compute),
                        flops);
  }

  for (size_t i = 0; i < runnable.size(); ++i) {
    InferenceCall& call = *runnable[i];
    if (!results[i].ok()) {
      call.finish(ToGrpcStatus(results[i].status()));
      continue;
    }
    attnserve::v1::InferResponse* resp = call.response;
    resp->set_id(call.request->id());
    EncodeTensor(results[i]->output, resp->mutable_output());
    if (call.inputs.need_weights) EncodeTensor(results[i]->attn_weights, resp->mutable_attn_weights());
    attnserve::v1::Timing* timing = resp->mutable_timing();
    timing->set_queue_us(absl::ToInt64Microseconds(start - call.arrival));
    timing->set_compute_us(absl::ToInt64Microseconds(compute));
    timing->set_batch_size(static_cast<int32_t>(runnable.size()));
    call.finish(grpc::Status::OK);
  }
}

}  // namespace attnserve
