#include "tools/attnbench_sessions.h"

#include "client/grpc_status.h"

#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/status_macros.h"

namespace attnserve {

namespace {

constexpr int64_t kWindow = 64;  // steps between truncations back to the context

std::vector<float> RandomRows(int64_t rows, int64_t e, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> v(static_cast<size_t>(rows * e));
  for (float& x : v) x = normal(rng);
  return v;
}

}  // namespace

struct SessionAppendSender::Lane {
  std::string id;
  int64_t steps_since_truncate = 0;
  attnserve::v1::AppendRequest request;
};

SessionAppendSender::SessionAppendSender(const Client* client, const Options& options)
    : client_(client), options_(options) {}

absl::Status SessionAppendSender::Prefill(const std::string& id, int64_t tokens) const {
  const std::vector<float> rows = RandomRows(tokens, embed_dim_, options_.seed + tokens);
  return sessions_->Append(id, options_.layer, rows, tokens).status();
}

absl::StatusOr<std::unique_ptr<SessionAppendSender>> SessionAppendSender::Create(const Client* client,
                                                                                 const Options& options) {
  if (options.sessions < 1 || options.context < 1 || options.prefill < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--sessions and --context must be >= 1, --prefill >= 0; got ",
                                                   options.sessions, ", ", options.context, ", ", options.prefill));
  }
  std::unique_ptr<SessionAppendSender> s(new SessionAppendSender(client, options));
  ATTN_ASSIGN_OR_RETURN(const attnserve::v1::Layer layer, client->GetLayer(options.layer));
  s->embed_dim_ = layer.config().embed_dim();
  ATTN_ASSIGN_OR_RETURN(s->sessions_, SessionClient::Create(client));
  s->token_ = RandomRows(1, s->embed_dim_, options.seed);
  for (int64_t i = 0; i < options.sessions; ++i) {
    auto lane = std::make_unique<Lane>();
    lane->id = absl::StrCat("attnbench-", options.run_id, "-", i);
    ATTN_RETURN_IF_ERROR(s->sessions_->CreateSession({lane->id, {options.layer}}).status());
    ATTN_RETURN_IF_ERROR(s->Prefill(lane->id, options.context));
    lane->request.set_session_id(lane->id);
    lane->request.set_layer(options.layer);
    attnserve::v1::Tensor* q = lane->request.mutable_query();
    q->add_shape(1);
    q->add_shape(s->embed_dim_);
    q->set_dtype(attnserve::v1::FLOAT32);
    q->set_raw_data(s->token_.data(), s->token_.size() * sizeof(float));
    s->step_bytes_ = static_cast<int64_t>(lane->request.ByteSizeLong());
    s->lanes_.push_back(std::move(lane));
  }
  if (options.prefill > 0) s->prefiller_ = std::thread([p = s.get()] { p->PrefillLoop(); });
  return s;
}

void SessionAppendSender::PrefillLoop() {
  for (int64_t n = 0; !stop_.load(); ++n) {
    const std::string id = absl::StrCat("attnbench-", options_.run_id, "-prefill-", n);
    if (!sessions_->CreateSession({id, {options_.layer}}).ok()) return;
    const absl::Time start = absl::Now();
    if (Prefill(id, options_.prefill).ok()) {
      prefill_us_total_.fetch_add(absl::ToInt64Microseconds(absl::Now() - start));
      prefills_done_.fetch_add(1);
    }
    (void)sessions_->Close(id);
  }
}

SessionAppendSender::~SessionAppendSender() {
  stop_.store(true);
  if (prefiller_.joinable()) prefiller_.join();
  for (const auto& lane : lanes_) (void)sessions_->Close(lane->id);
}

void SessionAppendSender::Send(uint64_t /*seq*/, uint64_t lane_index, std::function<void(const Outcome&)> done) {
  Lane& lane = *lanes_[lane_index % lanes_.size()];
  if (++lane.steps_since_truncate > kWindow) {  // keeps the context within [C, C + 64)
    (void)sessions_->Truncate(lane.id, options_.context);
    lane.steps_since_truncate = 1;
  }
  struct Call {
    grpc::ClientContext context;
    attnserve::v1::AppendResponse response;
  };
  auto* call = new Call;
  client_->PrepareContext(&call->context, std::nullopt);
  call->context.AddMetadata("x-attnserve-session", lane.id);
  sessions_->StubFor(lane.id)->async()->Append(&call->context, &lane.request, &call->response,
                                               [call, done = std::move(done)](grpc::Status status) {
                                                 Outcome o;
                                                 o.code = status.error_code();
                                                 if (status.ok() && call->response.has_timing()) {
                                                   o.has_timing = true;
                                                   o.queue_us = call->response.timing().queue_us();
                                                   o.compute_us = call->response.timing().compute_us();
                                                   o.batch_size = call->response.timing().batch_size();
                                                 }
                                                 if (o.code != 0) o.trace_id = ServerTraceId(call->context);
                                                 // before done: once the last answer is done, the run may end and exit
                                                 delete call;
                                                 done(o);
                                               });
}

}  // namespace attnserve
