#include "server/sessions/session_store.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log_string.h"
#include "common/status_macros.h"
#include "server/sessions/session_state.h"

namespace attnserve {

namespace {

constexpr size_t kEvictedIdsKept = 4096;

std::string Quoted(const std::string& s) { return absl::StrCat("'", BoundedForLog(s), "'"); }

}  // namespace

absl::StatusOr<std::unique_ptr<SessionStore>> SessionStore::Create(const Options& options) {
  if (options.pool == nullptr || options.registry == nullptr || options.clock == nullptr || !options.submit) {
    return absl::InvalidArgumentError("SessionStore: pool, registry, clock and submit are required");
  }
  if (options.default_idle_timeout_ms <= 0 || options.max_sessions <= 0 || options.max_queued_appends < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SessionStore: default_idle_timeout_ms and max_sessions must be > 0, max_queued_appends >= 0; got ",
        options.default_idle_timeout_ms, ", ", options.max_sessions, ", ", options.max_queued_appends));
  }
  std::unique_ptr<SessionStore> store(new SessionStore(options));
  // Until a session opens, the free-blocks gauge counts blocks of the widest layer served at start.
  for (const auto& layer : options.registry->Layers()) {
    store->widest_.store(std::max(store->widest_.load(), layer->appender().cache_width()));
  }
  store->ReportPool();
  return store;
}

SessionStore::~SessionStore() = default;

absl::Status SessionStore::CheckId(const std::string& id, const char* field) {
  if (id.empty() || id.size() > 128) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": expected 1 to 128 bytes, got ", id.size()));
  }
  for (char c : id) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == ':' || c == '-';
    if (!ok)
      return absl::InvalidArgumentError(absl::StrCat(field, ": expected only [A-Za-z0-9._:-], got ", Quoted(id)));
  }
  return absl::OkStatus();
}

std::shared_ptr<SessionStore::Session> SessionStore::FindLocked(const std::string& id) const {
  auto it = sessions_.find(id);
  return it == sessions_.end() ? nullptr : it->second;
}

absl::StatusOr<std::shared_ptr<SessionStore::Session>> SessionStore::FindForLocked(const std::string& id,
                                                                                   const Caller& caller) const {
  std::shared_ptr<Session> s = FindLocked(id);
  if (s == nullptr) return MissingLocked(id);
  if (!caller.any_session && s->owner != caller.token_digest) {
    return absl::PermissionDeniedError(
        absl::StrCat("session_id: session ", Quoted(id), " was opened with another token (an admin token may use it)"));
  }
  return s;
}

absl::Status SessionStore::MissingLocked(const std::string& id) const {
  auto it = evicted_.find(id);
  if (it != evicted_.end()) {
    return absl::FailedPreconditionError(absl::StrCat("session_id: session ", Quoted(id), " was evicted (", it->second,
                                                      "): create it again and re-append its prefix"));
  }
  return absl::NotFoundError(absl::StrCat("session_id: no session ", Quoted(id)));
}

absl::StatusOr<SessionInfo> SessionStore::InsertLocked(std::shared_ptr<Session> session) {
  if (sessions_.contains(session->id)) {
    return absl::AlreadyExistsError(absl::StrCat("session_id: session ", Quoted(session->id), " exists"));
  }
  if (static_cast<int64_t>(sessions_.size()) >= options_.max_sessions) {
    return absl::ResourceExhaustedError(
        absl::StrCat("sessions: ", sessions_.size(), " open, the server's max_sessions is ", options_.max_sessions));
  }
  evicted_.erase(session->id);
  sessions_[session->id] = session;
  if (options_.metrics) options_.metrics->SetSessionsActive(static_cast<int64_t>(sessions_.size()));
  return Describe(*session);
}

void SessionStore::RemoveLocked(const std::string& id, const char* evicted_for) {
  sessions_.erase(id);
  if (evicted_for != nullptr) {
    if (evicted_order_.size() >= kEvictedIdsKept) {
      evicted_.erase(evicted_order_.front());
      evicted_order_.pop_front();
    }
    evicted_order_.push_back(id);
    evicted_[id] = evicted_for;
    if (options_.metrics) options_.metrics->SessionEvicted(evicted_for);
  }
  if (options_.metrics) options_.metrics->SetSessionsActive(static_cast<int64_t>(sessions_.size()));
}

SessionInfo SessionStore::Describe(const Session& s) const {
  SessionInfo info;
  info.id = s.id;
  info.max_tokens = s.max_tokens;
  info.idle_timeout_ms = s.idle_timeout_ms;
  absl::MutexLock lock(&const_cast<Session&>(s).mu);
  info.idle_ms = absl::ToInt64Milliseconds(options_.clock->Now() - s.last_used);
  for (const auto& [name, lane] : s.lanes) info.layers.push_back({name, lane->tokens, lane->bytes, lane->cross});
  return info;
}

void SessionStore::ReportPool() const {
  if (options_.metrics == nullptr) return;
  // Free: blocks of the widest layer seen that still fit, a lower bound for narrower ones.
  options_.metrics->SetKvCacheBlocks(options_.pool->blocks_in_use(), options_.pool->blocks_available(widest_.load()));
}

int64_t SessionStore::size() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(sessions_.size());
}

std::vector<SessionInfo> SessionStore::List() const {
  std::vector<std::shared_ptr<Session>> all;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, s] : sessions_) all.push_back(s);
  }
  std::vector<SessionInfo> infos;
  for (const auto& s : all) infos.push_back(Describe(*s));
  return infos;
}

absl::StatusOr<SessionInfo> SessionStore::Get(const std::string& id, const Caller& caller) const {
  std::shared_ptr<Session> s;
  {
    absl::MutexLock lock(&mu_);
    ATTN_ASSIGN_OR_RETURN(s, FindForLocked(id, caller));
  }
  return Describe(*s);
}

absl::Status SessionStore::Close(const std::string& id, const Caller& caller) {
  {
    absl::MutexLock lock(&mu_);
    ATTN_RETURN_IF_ERROR(FindForLocked(id, caller).status());
    RemoveLocked(id, nullptr);
  }
  ReportPool();
  return absl::OkStatus();
}

int64_t SessionStore::EvictIdle(const std::string& reason) {
  const absl::Time now = options_.clock->Now();
  std::vector<std::shared_ptr<Session>> gone;  // freed outside the lock
  {
    absl::MutexLock lock(&mu_);
    std::vector<std::string> ids;
    for (const auto& [id, s] : sessions_) {
      absl::MutexLock session_lock(&s->mu);
      if (s->busy == 0 && now - s->last_used >= absl::Milliseconds(s->idle_timeout_ms)) ids.push_back(id);
    }
    for (const std::string& id : ids) {
      gone.push_back(sessions_[id]);
      RemoveLocked(id, reason == "pool_full" ? "pool_full" : "idle_timeout");
    }
  }
  const int64_t evicted = static_cast<int64_t>(gone.size());
  gone.clear();
  ReportPool();
  return evicted;
}

}  // namespace attnserve
