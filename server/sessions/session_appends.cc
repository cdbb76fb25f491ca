// SessionStore: appends, one at a time per (session, layer), in arrival order.
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/log_string.h"
#include "common/status_macros.h"
#include "server/sessions/prefill_chunks.h"
#include "server/sessions/session_state.h"
#include "server/sessions/session_store.h"

namespace attnserve {
namespace {

// The query of an append to `engine`'s layer: [T, E] with T >= 1 (and T <= the layer's limit), FLOAT32,
// BFLOAT16 or FLOAT16 (the decode stage took no other type; the engine converts 16-bit rows as it gathers them).
absl::Status CheckQuery(const InferenceCall& call, const ServedLayer& layer) {
  if (!call.decode_status.ok()) return call.decode_status;
  const TensorView& q = call.inputs.query;
  const int64_t e = layer.appender().embed_dim();
  if (q.shape.size() != 2 || q.shape[1] != e || q.shape[0] < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("query: expected [T, ", e, "] with T >= 1, got ", ShapeToString(q.shape)));
  }
  const int64_t limit = layer.config.max_sequence_length();
  if (limit > 0 && q.shape[0] > limit) {
    return absl::OutOfRangeError(
        absl::StrCat("query: ", q.shape[0], " tokens, past the layer's max_sequence_length ", limit));
  }
  return absl::OkStatus();
}

// The answer's size, known before anything is computed: output [T, E] and the weights over all `context`
// keys when asked, within the layer's max_response_bytes (a send limit the answer must not be computed for
// and then dropped).
absl::Status CheckAnswerBytes(const InferenceCall& call, const ServedLayer& layer, int64_t context) {
  const AppendEngine& engine = layer.appender();
  const int64_t limit = engine.limits().max_answer_bytes;
  const int64_t t = call.inputs.query.shape[0], e = engine.embed_dim(), h = engine.attention_heads();
  const bool averaged = call.inputs.average_attn_weights;
  const int64_t weights = call.inputs.need_weights ? AppendWeightsBytes(engine, t, context, averaged) : 0;
  const int64_t answer = 4 * t * e + weights;
  if (limit <= 0 || answer <= limit) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      weights > 0 ? "need_weights: " : "query: ", "the answer would be ", answer, " bytes (output [", t, ", ", e, "]",
      weights > 0 ? absl::StrCat(", attn_weights [", averaged ? "" : absl::StrCat(h, ", "), t, ", ", context, "]")
                  : "",
      "), past the layer's max_response_bytes of ", limit));
}

// A sliding-window layer's keys that no later token can see go back to the pool (the next token, at
// position tokens(), sees the window before it), all but one block more: a truncate of up to a block's
// tokens (a rejected draft) keeps every key its next token needs.
void FreeLeftWindow(SessionStore::Lane* lane) {
  const int64_t window = lane->layer->appender().sliding_window();
  if (window <= 0 || lane->cross) return;
  lane->cache.DropBefore(lane->cache.tokens() - window + 1 - lane->cache.block_tokens());
}

}  // namespace

void SessionStore::Append(const std::string& id, const std::string& layer, std::unique_ptr<InferenceCall> call,
                          const Caller& caller) {
  if (options_.instrument) options_.instrument(*call);
  std::shared_ptr<Session> session;
  Lane* lane = nullptr;
  absl::Status missing;
  {
    absl::MutexLock lock(&mu_);
    absl::StatusOr<std::shared_ptr<Session>> found = FindForLocked(id, caller);
    if (found.ok()) {
      session = std::move(*found);
    } else {
      missing = found.status();
    }
  }
  if (session == nullptr) {
    call->finish(missing);  // outside the store's lock: an answer logs and records
    return;
  }
  auto it = session->lanes.find(layer);
  if (it == session->lanes.end()) {
    call->finish(absl::NotFoundError(
        absl::StrCat("layer: session '", BoundedForLog(id), "' holds no layer '", BoundedForLog(layer), "'")));
    return;
  }
  lane = it->second.get();
  absl::Status refused;
  {
    absl::MutexLock lock(&session->mu);
    session->last_used = options_.clock->Now();
    if (lane->running) {
      refused = Enqueue(*session, *lane, call);  // takes `call` unless refused
      if (refused.ok()) return;
    } else {
      ++session->busy;
      lane->running = true;
    }
  }
  if (!refused.ok()) {
    call->finish(refused);  // outside the session's lock
    return;
  }
  Start(std::move(session), lane, std::move(call));
}

absl::Status SessionStore::Enqueue(Session& session, Lane& lane, std::unique_ptr<InferenceCall>& call) {
  if (static_cast<int64_t>(lane.waiting.size()) >= options_.max_queued_appends) {
    return absl::ResourceExhaustedError(absl::StrCat("session_id: ", lane.waiting.size(),
                                                     " appends already wait for this session and layer (max ",
                                                     options_.max_queued_appends, ")"));
  }
  if (options_.memory != nullptr) {
    absl::StatusOr<MemoryBudget::Reservation> held = options_.memory->Reserve(call->request_bytes);
    if (!held.ok()) return held.status();
    call->memory = std::move(*held);  // replaced by the dispatcher's reservation when the call starts
  }
  ++session.busy;
  lane.waiting.push_back(std::move(call));
  return absl::OkStatus();
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

absl::Status SessionStore::Admit(Session& session, Lane& lane, InferenceCall* call) {
  ATTN_RETURN_IF_ERROR(CheckQuery(*call, *lane.layer));
  const int64_t t = call->inputs.query.shape[0];
  ATTN_RETURN_IF_ERROR(CheckAnswerBytes(*call, *lane.layer, lane.cache.tokens() + (lane.cross ? 0 : t)));
  return ReserveBlocks(session, lane, t);
}

void SessionStore::Start(std::shared_ptr<Session> session, Lane* lane, std::unique_ptr<InferenceCall> call) {
  call->layer = lane->layer;  // a refusal is counted with the version the session holds
  const absl::Status ready = Admit(*session, *lane, call.get());
  ReportPool();
  auto answer = std::move(call->finish);
  if (!ready.ok()) {
    answer(ready);
    TurnDone(std::move(session), lane);
    return;
  }
  const int64_t tokens = call->inputs.query.shape[0], before = lane->cache.tokens();
  BindAppend(lane, session, call.get());
  call->finish = [this, session, lane, answer = std::move(answer), tokens, before,
                  arrival = call->arrival](const absl::Status& status) {
    if (!status.ok()) {
      // An append answered with an error leaves the cache as it was, the blocks it reserved given back.
      if (!lane->cross) lane->cache.Truncate(before);
      lane->cache.ReleaseReserved();
    } else {
      FreeLeftWindow(lane);
      if (options_.metrics)
        options_.metrics->AppendDone(tokens > 1, absl::ToDoubleSeconds(options_.clock->Now() - arrival), tokens);
    }
    PublishLane(*session, lane);  // before the answer: a GetSession sent after it must see these tokens
    answer(status);
    TurnDone(session, lane);
  };
  const int64_t chunk = options_.prefill_chunk_tokens;
  if (lane->cross || chunk <= 0 ||
      tokens <= PrefillChunkTokens(lane->layer->appender(), chunk, before, lane->cache.block_tokens())) {
    options_.submit(std::move(call));
    return;
  }
  SubmitInChunks(std::move(call), chunk, *options_.clock, options_.memory, options_.submit);
}

void SessionStore::BindAppend(Lane* lane, std::shared_ptr<Session> session, InferenceCall* call) const {
  const int64_t tokens = call->inputs.query.shape[0];
  call->layer = lane->layer;
  call->layer_name = lane->layer_name;
  call->session = std::make_unique<InferenceCall::SessionWork>();
  CachedAppend& a = call->session->append;
  a.query = call->inputs.query.data;
  a.query_dtype = call->inputs.query.dtype;
  a.tokens = tokens;
  a.cache = &lane->cache;
  a.cross_attention = lane->cross;
  a.need_weights = call->inputs.need_weights;
  a.average_attn_weights = call->inputs.average_attn_weights;
  call->session->keep_alive = std::move(session);
  SizeAppend(lane->layer->appender(), call);
}

void SessionStore::PublishLane(Session& session, Lane* lane) {
  absl::MutexLock lock(&session.mu);
  lane->tokens = lane->cache.tokens();
  lane->bytes = lane->cache.bytes();
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
