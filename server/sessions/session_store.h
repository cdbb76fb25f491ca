// The sessions of a server: their ids, each session's KV cache per layer (core/kv_cache_pool.h) and the
// layer version it was opened with, the order of each (session, layer)'s appends, and eviction of idle
// sessions. No wire protocol here: SessionService (api/) decodes requests into these calls.
//
// Appends of one session and layer run one at a time, in arrival order (a lane): the next starts when the
// previous one is answered. Starting one checks the session's limits, reserves its cache blocks (evicting
// idle sessions when the pool is full), then hands the call to `submit` (the Dispatcher: admit, queue,
// batch with other sessions' appends and stateless requests, engine).
//
// A session keeps the layer version it was created with until it closes: a replaced or unloaded layer goes
// on serving its open sessions, so a cache never mixes two versions' keys.
//
// Thread-safety: every method may be called from any thread at once.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/kv_cache_pool.h"
#include "server/batching/clock.h"
#include "server/observability/metrics.h"
#include "server/runtime/cpu_shares.h"
#include "server/runtime/inference_call.h"
#include "server/runtime/layer_registry.h"
#include "server/runtime/memory_budget.h"

namespace attnserve {

// A session as GetSession shows it.
struct SessionInfo {
  struct Layer {
    std::string name;
    int64_t tokens = 0;
    int64_t bytes = 0;
    bool cross_attention = false;
  };
  std::string id;
  std::vector<Layer> layers;
  int64_t max_tokens = 0;
  int64_t idle_timeout_ms = 0;
  int64_t idle_ms = 0;
};

// Who calls the session store: what it opens or forks is its own, and the others' sessions are refused to it
// (PERMISSION_DENIED naming session_id) unless `any_session`. The default, for a server without tokens: anyone
// may use any session.
struct SessionCaller {
  std::string token_digest;  // SHA-256 of the caller's token; empty without tokens
  bool any_session = true;   // authentication off, or an admin token
};

class SessionStore {
 public:
  struct Options {
    KvCachePool* pool = nullptr;              // required, not owned
    const LayerRegistry* registry = nullptr;  // required, not owned
    const Clock* clock = RealClock();         // required, not owned
    ServerMetrics* metrics = nullptr;         // may be null, not owned
    // An append waiting for its turn holds its request message: it reserves the message's bytes here until it
    // starts (then the dispatcher reserves all it may cost). May be null: no budget.
    MemoryBudget* memory = nullptr;
    // Admits and queues a started append (the Dispatcher's Submit); required.
    std::function<void(std::unique_ptr<InferenceCall>)> submit;
    // Wraps an append's finish with its metrics and logs (the Dispatcher's Instrument) as it arrives, so that
    // one refused or failed here is counted, and a chunked one's log sees its whole answer. May be empty.
    std::function<void(InferenceCall&)> instrument;
    // A memory's projection takes a share of the CPUs from here for each of its blocks, as a batch does, so
    // that it divides the CPUs with the batches computing meanwhile. May be null: each block uses the calling
    // thread's OpenMP default.
    CpuShares* shares = nullptr;
    // A session's idle_timeout_ms when it asks for none (> 0).
    int64_t default_idle_timeout_ms = 600'000;
    // Sessions open at once at most (> 0): CreateSession and ForkSession past it are RESOURCE_EXHAUSTED.
    int64_t max_sessions = 10'000;
    // Appends of one session and layer waiting behind the running one, at most (>= 0).
    int64_t max_queued_appends = 64;
    // A self-attention append costing more than this many tokens of a fresh session is computed in chunks
    // of that cost (this many tokens at the start of a prompt, fewer as the context grows: see
    // PrefillChunkTokens), each its own trip through the layer's queue, so that other sessions' decode
    // steps run between them (chunked prefill). 0: never chunked. 64, not 128: with 32 sessions decoding
    // beside an 8192-token prefill, decode p99 rose 1.6x instead of 2.1-3.4x, and the prefill took 1.5x as
    // long (BENCHMARKS.md, issue #11).
    int64_t prefill_chunk_tokens = 64;
  };
  static absl::StatusOr<std::unique_ptr<SessionStore>> Create(const Options& options);

  // Options::memory (may be null), for what the service holds of a request before it reaches the store.
  MemoryBudget* memory_budget() const { return options_.memory; }
  ~SessionStore();

  using Caller = SessionCaller;
  // One layer's cross-attention memory: [tokens, kdim] floats, read during Open only.
  struct Memory {
    const float* data = nullptr;
    int64_t tokens = 0;
    int64_t dim = 0;
  };
  struct OpenArgs {
    std::string id;
    std::vector<std::string> layers;
    int64_t max_tokens = 0;       // 0: each layer's max_sequence_length
    int64_t idle_timeout_ms = 0;  // 0: Options::default_idle_timeout_ms
    std::map<std::string, Memory> memory;
    // Checked before each block of a memory's projection (kMemoryBlockTokens rows): an open whose caller
    // cancelled it or whose deadline passed stops there, and nothing of it is kept.
    absl::Time deadline = absl::InfiniteFuture();
    std::function<bool()> is_cancelled;  // may be empty
    Caller caller;                       // the session's owner
  };
  // Rows of a memory projected at a time: about 5 ms of a 2-CPU team at E=768, the longest a batch starting
  // meanwhile shares the CPUs with it, and how soon a cancelled open stops.
  static constexpr int64_t kMemoryBlockTokens = 512;
  // INVALID_ARGUMENT naming the field (id, layers, memory), ALREADY_EXISTS, NOT_FOUND for a layer,
  // RESOURCE_EXHAUSTED (sessions, the pool for a memory, or the memory budget for its projection: a block's keys
  // and values, [min(S, kMemoryBlockTokens), E] each, reserved while it runs), CANCELLED or DEADLINE_EXCEEDED
  // (while projecting a memory).
  absl::StatusOr<SessionInfo> Open(const OpenArgs& args);
  // What Open would refuse before it projects anything (every error above but the pool, the budget, CANCELLED
  // and DEADLINE_EXCEEDED): so that an open refused for its request or the sessions open now does not wait for
  // the memories before it (SessionService checks a CreateSession with memories here before it queues it).
  absl::Status CheckOpen(const OpenArgs& args) const { return PlanOpen(args).status(); }
  // Each refuses a session that is not `caller`'s (Caller). The fork is the caller's.
  absl::StatusOr<SessionInfo> Fork(const std::string& id, const std::string& new_id, const Caller& caller = {});
  absl::StatusOr<SessionInfo> Truncate(const std::string& id, int64_t tokens, const Caller& caller = {});
  absl::Status Close(const std::string& id, const Caller& caller = {});
  absl::StatusOr<SessionInfo> Get(const std::string& id, const Caller& caller = {}) const;
  std::vector<SessionInfo> List() const;

  // Queues an append of `call->inputs.query` ([T, E]) to `layer` of session `id`: `call` is answered through
  // its finish (set by the caller), now for a refusal or once computed. NOT_FOUND, FAILED_PRECONDITION
  // "evicted", INVALID_ARGUMENT, OUT_OF_RANGE (past max_tokens), RESOURCE_EXHAUSTED (queue or pool).
  // `need_weights` and `average_attn_weights` come from call->inputs.
  void Append(const std::string& id, const std::string& layer, std::unique_ptr<InferenceCall> call,
              const Caller& caller = {});

  // Evicts the sessions idle past their idle_timeout_ms with no append queued or running; returns how many.
  int64_t EvictIdle(const std::string& reason) ABSL_LOCKS_EXCLUDED(mu_);
  int64_t size() const ABSL_LOCKS_EXCLUDED(mu_);

  // "1 to 128 bytes of [A-Za-z0-9._:-]", else INVALID_ARGUMENT naming `field`.
  static absl::Status CheckId(const std::string& id, const char* field);

  // Defined in session_state.h, for the store's own files.
  struct Lane;
  struct Session;

 private:
  // An open's layers, looked up (args.layers[i]), and their smallest max_sequence_length (0: none).
  struct OpenPlan {
    std::vector<std::shared_ptr<const ServedLayer>> layers;
    int64_t limit = 0;
  };
  absl::StatusOr<OpenPlan> PlanOpen(const OpenArgs& args) const ABSL_LOCKS_EXCLUDED(mu_);

  explicit SessionStore(const Options& options) : options_(options) {}
  std::shared_ptr<Session> FindLocked(const std::string& id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status MissingLocked(const std::string& id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Session `id` if `caller` may use it; else why not (MissingLocked, or PERMISSION_DENIED).
  absl::StatusOr<std::shared_ptr<Session>> FindForLocked(const std::string& id, const Caller& caller) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<SessionInfo> InsertLocked(std::shared_ptr<Session> session) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RemoveLocked(const std::string& id, const char* evicted_for) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  SessionInfo Describe(const Session& s) const;
  // Starts an append whose turn it is; when it cannot start, answers it and starts the next.
  void Start(std::shared_ptr<Session> session, Lane* lane, std::unique_ptr<InferenceCall> call);
  absl::Status ReserveBlocks(Session& session, Lane& lane, int64_t tokens);
  // Queues `call` behind the lane's running append (taking it), or says why not (the queue's bound, the
  // memory budget for its request message). Called with the session's mu held.
  // (No ABSL_EXCLUSIVE_LOCKS_REQUIRED(session.mu): Session is incomplete here, which clang refuses.)
  absl::Status Enqueue(Session& session, Lane& lane, std::unique_ptr<InferenceCall>& call);
  // The checks of an append whose turn it is (query, answer size, limits), then the cache blocks it will fill.
  absl::Status Admit(Session& session, Lane& lane, InferenceCall* call);
  // Sets what the dispatcher and executor need of an admitted append: its layer version and SessionWork.
  void BindAppend(Lane* lane, std::shared_ptr<Session> session, InferenceCall* call) const;
  // Copies the lane's cache size (tokens, bytes) to what GetSession and ListSessions report.
  void PublishLane(Session& session, Lane* lane);
  // The lane's running append was answered: the next waiting one starts.
  void TurnDone(std::shared_ptr<Session> session, Lane* lane);
  void ReportPool() const;

  const Options options_;
  std::atomic<int64_t> widest_{1};  // the widest cache seen, for the free-blocks gauge
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  // Ids evicted lately (bounded), so their next call is told "evicted" rather than NOT_FOUND.
  std::deque<std::string> evicted_order_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::string> evicted_ ABSL_GUARDED_BY(mu_);  // id -> reason
};

}  // namespace attnserve
