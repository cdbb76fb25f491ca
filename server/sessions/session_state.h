// SessionStore's inner state (its .cc files only): a session and its lanes.
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <string>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/kv_cache_pool.h"
#include "server/runtime/inference_call.h"
#include "server/runtime/layer_registry.h"
#include "server/sessions/session_store.h"

namespace attnserve {

// One (session, layer): its cache and the appends waiting for their turn.
struct SessionStore::Lane {
  Lane(std::string name, std::shared_ptr<const ServedLayer> served, bool cross_attention, KvSequence kv)
      : layer_name(std::move(name)), layer(std::move(served)), cross(cross_attention), cache(std::move(kv)) {}
  const std::string layer_name;
  const std::shared_ptr<const ServedLayer> layer;  // the version the session was opened with
  const bool cross;
  // Written by the lane's running append only; read by others only while no append runs (Session::busy 0).
  KvSequence cache;
  // Guarded by the session's mu:
  bool running = false;
  std::deque<std::unique_ptr<InferenceCall>> waiting;
  int64_t tokens = 0;  // the cache's, as of the last answered append
  int64_t bytes = 0;
};

struct SessionStore::Session {
  std::string id;
  std::string owner;  // Caller::token_digest of who opened (or forked) it; empty: anyone's
  int64_t max_tokens = 0;
  int64_t idle_timeout_ms = 0;
  std::map<std::string, std::unique_ptr<Lane>> lanes;  // fixed once the session is inserted
  absl::Mutex mu;
  absl::Time last_used ABSL_GUARDED_BY(mu);
  int64_t busy ABSL_GUARDED_BY(mu) = 0;  // appends queued or running: never evicted, forked or truncated then
};

}  // namespace attnserve
