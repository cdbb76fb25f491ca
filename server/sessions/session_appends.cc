// SessionStore: appends, one at a time per (session, layer), in arrival order.
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/log_string.h"
#include "server/sessions/session_state.h"
#include "server/sessions/session_store.h"

namespace attnserve {
namespace {

// The query of an append to `engine`'s layer: [T, E] FLOAT32 with T >= 1 (and T <= the layer's limit).
absl::Status CheckQuery(const InferenceCall& call, const ServedLayer& layer) {
  if (!call.decode_status.ok()) return call.decode_status;
  const TensorView& q = call.inputs.query;
  const int64_t e = layer.engine->config().embed_dim;
  if (q.dtype != DType::kFloat32 || q.shape.size() != 2 || q.shape[1] != e || q.shape[0] < 1) {
    return absl::InvalidArgumentError(absl::StrCat("query: expected FLOAT32 [T, ", e, "] with T >= 1, got ",
                                                   DTypeName(q.dtype), " ", ShapeToString(q.shape)));
  }
  const int64_t limit = layer.config.max_sequence_length();
  if (limit > 0 && q.shape[0] > limit) {
    return absl::OutOfRangeError(
        absl::StrCat("query: ", q.shape[0], " tokens, past the layer's max_sequence_length ", limit));
  }
  return absl::OkStatus();
}

}  // namespace

void SessionStore::Append(const std::string& id, const std::string& layer, std::unique_ptr<InferenceCall> call) {
  std::shared_ptr<Session> session;
  Lane* lane = nullptr;
  {
    absl::MutexLock lock(&mu_);
    session = FindLocked(id);
    if (session == nullptr) {
      const absl::Status missing = MissingLocked(id);
      call->finish(missing);
      return;
    }
  }
  auto it = session->lanes.find(layer);
  if (it == session->lanes.end()) {
    call->finish(absl::NotFoundError(
        absl::StrCat("layer: session '", BoundedForLog(id), "' holds no layer '", BoundedForLog(layer), "'")));
    return;
  }
  lane = it->second.get();
  {
    absl::MutexLock lock(&session->mu);
    session->last_used = options_.clock->Now();
    if (lane->running) {
      if (static_cast<int64_t>(lane->waiting.size()) >= options_.max_queued_appends) {
        call->finish(absl::ResourceExhaustedError(absl::StrCat("session_id: ", lane->waiting.size(),
                                                               " appends already wait for this session and layer (max ",
                                                               options_.max_queued_appends, ")")));
        return;
      }
      ++session->busy;
      lane->waiting.push_back(std::move(call));
      return;
    }
    ++session->busy;
    lane->running = true;
  }
  Start(std::move(session), lane, std::move(call));
}

absl::Status SessionStore::ReserveBlocks(Session& session, Lane& lane, int64_t tokens) {
  if (lane.cross) return absl::OkStatus();
  if (session.max_tokens > 0 && lane.cache.tokens() + tokens > session.max_tokens) {
    return absl::OutOfRangeError(absl::StrCat("query: ", tokens, " more tokens would make ",
                                              lane.cache.tokens() + tokens, ", past the session's max_tokens ",
                                              session.max_tokens));
  }
  absl::Status reserved = lane.cache.Reserve(tokens);
  if (reserved.code() == absl::StatusCode::kResourceExhausted && EvictIdle("pool_full") > 0) {
    reserved = lane.cache.Reserve(tokens);
  }
  return reserved;
}

void SessionStore::Start(std::shared_ptr<Session> session, Lane* lane, std::unique_ptr<InferenceCall> call) {
  absl::Status ready = CheckQuery(*call, *lane->layer);
  if (ready.ok()) ready = ReserveBlocks(*session, *lane, call->inputs.query.shape[0]);
  ReportPool();
  auto answer = std::move(call->finish);
  if (!ready.ok()) {
    answer(ready);
    TurnDone(std::move(session), lane);
    return;
  }
  const int64_t tokens = call->inputs.query.shape[0];
  call->layer = lane->layer;
  call->layer_name = lane->layer_name;
  call->session = std::make_unique<InferenceCall::SessionWork>();
  CachedAppend& a = call->session->append;
  a.query = static_cast<const float*>(call->inputs.query.data);
  a.tokens = tokens;
  a.cache = &lane->cache;
  a.cross_attention = lane->cross;
  a.need_weights = call->inputs.need_weights;
  a.average_attn_weights = call->inputs.average_attn_weights;
  call->session->keep_alive = session;
  call->finish = [this, session, lane, answer = std::move(answer), tokens,
                  arrival = call->arrival](const absl::Status& status) {
    if (status.ok() && options_.metrics) {
      options_.metrics->AppendDone(tokens > 1, absl::ToDoubleSeconds(options_.clock->Now() - arrival), tokens);
    }
    answer(status);
    TurnDone(session, lane);
  };
  options_.submit(std::move(call));
}

void SessionStore::TurnDone(std::shared_ptr<Session> session, Lane* lane) {
  std::unique_ptr<InferenceCall> next;
  {
    absl::MutexLock lock(&session->mu);
    lane->tokens = lane->cache.tokens();
    lane->bytes = lane->cache.bytes();
    --session->busy;
    session->last_used = options_.clock->Now();
    if (lane->waiting.empty()) {
      lane->running = false;
    } else {
      next = std::move(lane->waiting.front());
      lane->waiting.pop_front();
    }
  }
  ReportPool();
  if (next != nullptr) Start(std::move(session), lane, std::move(next));
}

}  // namespace attnserve
