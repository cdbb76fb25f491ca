// SessionStore: opening, forking and truncating sessions.
#include <algorithm>
#include <optional>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/log_string.h"
#include "common/status_macros.h"
#include "server/sessions/session_state.h"
#include "server/sessions/session_store.h"

namespace attnserve {
namespace {

std::string Quoted(const std::string& s) { return absl::StrCat("'", BoundedForLog(s), "'"); }

// What projecting a memory takes besides the memory: the CPUs' shares (may be null) and when to stop.
struct Projection {
  CpuShares* shares;
  const Clock* clock;
  const SessionStore::OpenArgs* args;
};

// `memory` projected into `cache` kMemoryBlockTokens rows at a time, each block on its own CPU share (a batch
// starting meanwhile gets its part of the CPUs at the next block), stopping between blocks once the open is
// cancelled or past its deadline.
absl::Status ProjectInBlocks(const MultiheadAttention& engine, const std::string& layer,
                             const SessionStore::Memory& memory, const Projection& projection, KvSequence* cache) {
  for (int64_t row = 0; row < memory.tokens; row += SessionStore::kMemoryBlockTokens) {
    std::optional<CpuShares::Share> share;
    if (projection.shares != nullptr) share.emplace(projection.shares->Take());
    const SessionStore::OpenArgs& args = *projection.args;
    const bool cancelled = args.is_cancelled && args.is_cancelled();
    if (cancelled || projection.clock->Now() >= args.deadline) {
      const std::string done = absl::StrCat(" after projecting ", row, " of the ", memory.tokens, " rows of memory[",
                                            BoundedForLog(layer), "]");
      return cancelled ? absl::CancelledError("session open cancelled" + done)
                       : absl::DeadlineExceededError("deadline passed" + done);
    }
    const int64_t rows = std::min(SessionStore::kMemoryBlockTokens, memory.tokens - row);
    if (absl::Status s =
            engine.ProjectMemory(memory.data + row * memory.dim, rows, cache, share ? share->threads() : 0);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

// Whether `layer` (layers[i] of the request, `field`) can hold a lane with `memory` (may be null).
absl::Status CheckLane(const std::string& field, const ServedLayer& layer, const SessionStore::Memory* memory) {
  if (memory != nullptr && !layer.appender().supports_cross_attention()) {
    return absl::InvalidArgumentError(absl::StrCat("memory[", BoundedForLog(layer.config.name()),
                                                   "]: a DECODER_ATTENTION layer has no cross-attention sessions"));
  }
  if (memory == nullptr) {
    if (layer.engine != nullptr && !layer.engine->config().same_qkv_dim()) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": layer ", Quoted(layer.config.name()),
                       " has kdim/vdim != embed_dim: open it with a memory (cross-attention)"));
    }
    return absl::OkStatus();
  }
  const int64_t key_dim = layer.engine->config().key_dim();
  const int64_t limit = layer.config.max_sequence_length();
  if (memory->dim != key_dim || memory->tokens < 1 || (limit > 0 && memory->tokens > limit)) {
    return absl::InvalidArgumentError(absl::StrCat("memory[", BoundedForLog(layer.config.name()), "]: expected [S, ",
                                                   key_dim, "] with 1 <= S <= ", limit, ", got [", memory->tokens, ", ",
                                                   memory->dim, "]"));
  }
  return absl::OkStatus();
}

// The lane of `layer` (checked by CheckLane), its memory projected when it has one.
absl::StatusOr<std::unique_ptr<SessionStore::Lane>> MakeLane(std::shared_ptr<const ServedLayer> layer,
                                                             const SessionStore::Memory* memory, KvCachePool* pool,
                                                             const Projection& projection) {
  KvSequence cache(pool, layer->appender().cache_width());
  if (memory != nullptr) {
    if (absl::Status s = ProjectInBlocks(*layer->engine, layer->config.name(), *memory, projection, &cache); !s.ok()) {
      return s;
    }
  }
  auto lane =
      std::make_unique<SessionStore::Lane>(layer->config.name(), std::move(layer), memory != nullptr, std::move(cache));
  lane->tokens = lane->cache.tokens();
  lane->bytes = lane->cache.bytes();
  return lane;
}

// A sliding-window layer frees the keys no later token can see: a truncate must keep those the next token
// needs (the window before it).
absl::Status CheckTruncate(const SessionStore::Lane& lane, int64_t tokens) {
  const int64_t window = lane.layer->appender().sliding_window();
  if (lane.cross || tokens >= lane.cache.tokens() || lane.cache.first_token() == 0) return absl::OkStatus();
  const int64_t needed = window > 0 ? std::max<int64_t>(0, tokens - window + 1) : 0;
  if (needed >= lane.cache.first_token()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "tokens: layer ", Quoted(lane.layer_name), " has freed the keys before token ", lane.cache.first_token(),
      " (they left its sliding window of ", window, "): truncate to at least ", lane.cache.first_token() + window - 1,
      " tokens, got ", tokens));
}

}  // namespace

absl::StatusOr<SessionStore::OpenPlan> SessionStore::PlanOpen(const OpenArgs& args) const {
  if (absl::Status s = CheckId(args.id, "session_id"); !s.ok()) return s;
  if (args.layers.empty()) return absl::InvalidArgumentError("layers: expected at least one layer name");
  if (args.max_tokens < 0 || args.idle_timeout_ms < 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens and idle_timeout_ms: expected >= 0, got ",
                                                   args.max_tokens, " and ", args.idle_timeout_ms));
  }
  for (const auto& [name, memory] : args.memory) {
    if (std::find(args.layers.begin(), args.layers.end(), name) == args.layers.end()) {
      return absl::InvalidArgumentError(absl::StrCat("memory: ", Quoted(name), " is not one of the session's layers"));
    }
  }
  {
    absl::MutexLock lock(&mu_);  // Open checks again as it inserts the session
    if (sessions_.contains(args.id))
      return absl::AlreadyExistsError(absl::StrCat("session_id: session ", Quoted(args.id), " exists"));
  }
  OpenPlan plan;
  std::set<std::string> listed;
  for (size_t i = 0; i < args.layers.size(); ++i) {
    const std::string field = absl::StrCat("layers[", i, "]");
    std::shared_ptr<const ServedLayer> layer = options_.registry->Find(args.layers[i]);
    if (layer == nullptr) return absl::NotFoundError(absl::StrCat(field, ": no layer named ", Quoted(args.layers[i])));
    if (!listed.insert(args.layers[i]).second) return absl::InvalidArgumentError(absl::StrCat(field, ": listed twice"));
    auto memory = args.memory.find(args.layers[i]);
    if (absl::Status s = CheckLane(field, *layer, memory == args.memory.end() ? nullptr : &memory->second); !s.ok()) {
      return s;
    }
    const int64_t layer_limit = layer->config.max_sequence_length();
    if (layer_limit > 0) plan.limit = plan.limit == 0 ? layer_limit : std::min(plan.limit, layer_limit);
    plan.layers.push_back(std::move(layer));
  }
  if (plan.limit > 0 && args.max_tokens > plan.limit) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens: ", args.max_tokens, " is past the layers' max_sequence_length ", plan.limit));
  }
  // Last, as InsertLocked checks it: a request that can never open gets its own error, not a retryable one.
  absl::MutexLock lock(&mu_);
  if (static_cast<int64_t>(sessions_.size()) >= options_.max_sessions) {
    return absl::ResourceExhaustedError(
        absl::StrCat("sessions: ", sessions_.size(), " open, the server's max_sessions is ", options_.max_sessions));
  }
  return plan;
}

absl::StatusOr<SessionInfo> SessionStore::Open(const OpenArgs& args) {
  absl::StatusOr<OpenPlan> plan = PlanOpen(args);
  if (!plan.ok()) return plan.status();
  auto session = std::make_shared<Session>();
  session->id = args.id;
  session->owner = args.caller.token_digest;
  session->idle_timeout_ms = args.idle_timeout_ms > 0 ? args.idle_timeout_ms : options_.default_idle_timeout_ms;
  session->max_tokens = args.max_tokens > 0 ? args.max_tokens : plan->limit;
  for (size_t i = 0; i < plan->layers.size(); ++i) {
    std::shared_ptr<const ServedLayer>& layer = plan->layers[i];
    auto memory = args.memory.find(args.layers[i]);
    // A block of a memory's keys and values ([kMemoryBlockTokens, E] each at most), until it is cached.
    MemoryBudget::Reservation projecting;
    if (memory != args.memory.end() && options_.memory != nullptr) {
      const int64_t rows = std::min(memory->second.tokens, kMemoryBlockTokens);
      const int64_t bytes = 2 * rows * layer->appender().embed_dim() * int64_t{sizeof(float)};
      absl::StatusOr<MemoryBudget::Reservation> reserved = options_.memory->Reserve(bytes);
      if (!reserved.ok()) return reserved.status();
      projecting = std::move(*reserved);
    }
    widest_.store(std::max(widest_.load(), layer->appender().cache_width()));
    absl::StatusOr<std::unique_ptr<Lane>> lane =
        MakeLane(std::move(layer), memory == args.memory.end() ? nullptr : &memory->second, options_.pool,
                 Projection{options_.shares, options_.clock, &args});
    if (!lane.ok()) return lane.status();
    session->lanes[args.layers[i]] = std::move(*lane);
  }
  {
    absl::MutexLock lock(&session->mu);
    session->last_used = options_.clock->Now();
  }
  absl::MutexLock lock(&mu_);
  return InsertLocked(std::move(session));
}

absl::StatusOr<SessionInfo> SessionStore::Fork(const std::string& id, const std::string& new_id, const Caller& caller) {
  if (absl::Status s = CheckId(new_id, "new_session_id"); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  ATTN_ASSIGN_OR_RETURN(std::shared_ptr<Session> from, FindForLocked(id, caller));
  auto fork = std::make_shared<Session>();
  fork->id = new_id;
  fork->owner = caller.token_digest;
  fork->max_tokens = from->max_tokens;
  fork->idle_timeout_ms = from->idle_timeout_ms;
  {
    absl::MutexLock session_lock(&from->mu);
    if (from->busy > 0) {
      return absl::FailedPreconditionError(absl::StrCat("session_id: session ", Quoted(id), " has ", from->busy,
                                                        " appends in flight: fork it once they are answered"));
    }
    for (const auto& [name, lane] : from->lanes) {
      auto copy = std::make_unique<Lane>(name, lane->layer, lane->cross, lane->cache.Fork());
      copy->tokens = lane->tokens;
      copy->bytes = lane->bytes;
      fork->lanes[name] = std::move(copy);
    }
  }
  {
    absl::MutexLock fork_lock(&fork->mu);
    fork->last_used = options_.clock->Now();
  }
  return InsertLocked(std::move(fork));
}

absl::StatusOr<SessionInfo> SessionStore::Truncate(const std::string& id, int64_t tokens, const Caller& caller) {
  if (tokens < 0) return absl::InvalidArgumentError(absl::StrCat("tokens: expected >= 0, got ", tokens));
  std::shared_ptr<Session> s;
  {
    absl::MutexLock lock(&mu_);
    ATTN_ASSIGN_OR_RETURN(s, FindForLocked(id, caller));
  }
  {
    absl::MutexLock session_lock(&s->mu);
    if (s->busy > 0) {
      return absl::FailedPreconditionError(absl::StrCat("session_id: session ", Quoted(id), " has ", s->busy,
                                                        " appends in flight: truncate it once they are answered"));
    }
    for (auto& [name, lane] : s->lanes) {  // checked before any lane changes
      if (absl::Status kept = CheckTruncate(*lane, tokens); !kept.ok()) return kept;
    }
    for (auto& [name, lane] : s->lanes) {
      if (lane->cross) continue;
      lane->cache.Truncate(tokens);
      lane->tokens = lane->cache.tokens();
      lane->bytes = lane->cache.bytes();
    }
  }
  ReportPool();
  return Describe(*s);
}

}  // namespace attnserve
