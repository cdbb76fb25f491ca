// attnbench --sessions N --context C: decode steps on server-side KV caches (attnserve.v1.SessionService).
// Before the run each of the N sessions (one per closed-loop worker) is created and prefilled with C random
// tokens; each request is then one Append of one token (a decode step) to the worker's session. Every 64
// steps a session is truncated back to C tokens (before its next step, and counted in that step's latency),
// so the context stays within [C, C + 64) for the whole run. With --prefill T a background thread keeps
// one more session prefilling T tokens at a time (create, one Append of T tokens, close) during the run: how
// much a long prefill delays the decode steps.
//
// Thread-safety: Send may be called from any number of threads at once (one step in flight per lane).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "client/session_client.h"
#include "tools/attnbench_runner.h"

namespace attnserve {

class SessionAppendSender final : public RequestSender {
 public:
  struct Options {
    std::string layer;
    int64_t sessions = 1;      // one per lane
    int64_t context = 1024;    // tokens prefilled, and kept
    int64_t prefill = 0;       // tokens of the background prefills; 0: none
    uint64_t seed = 1;
    std::string run_id;        // makes the session ids unique per run
  };
  // Creates and prefills the sessions (not timed). `client` (not owned) must outlive the sender.
  static absl::StatusOr<std::unique_ptr<SessionAppendSender>> Create(const Client* client, const Options& options);
  // Stops the background prefills and closes every session.
  ~SessionAppendSender() override;
  void Send(uint64_t seq, uint64_t lane, std::function<void(const Outcome&)> done) override;

  // Bytes of one decode step's request (what a stateless client would send instead: the whole context).
  int64_t step_request_bytes() const { return step_bytes_; }
  // Background prefills completed so far (warm-up included), and their mean time from first chunk to answer.
  int64_t prefills_done() const { return prefills_done_.load(); }
  double prefill_seconds_mean() const {
    const int64_t done = prefills_done_.load();
    return done > 0 ? 1e-6 * static_cast<double>(prefill_us_total_.load()) / static_cast<double>(done) : 0.0;
  }

 private:
  struct Lane;
  SessionAppendSender(const Client* client, const Options& options);
  absl::Status Prefill(const std::string& id, int64_t tokens) const;
  void PrefillLoop();

  const Client* client_;
  const Options options_;
  int64_t embed_dim_ = 0;
  int64_t step_bytes_ = 0;
  std::unique_ptr<SessionClient> sessions_;
  std::vector<std::unique_ptr<Lane>> lanes_;
  std::vector<float> token_;  // the decode step's input [1, E]
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> prefills_done_{0};
  std::atomic<int64_t> prefill_us_total_{0};
  std::thread prefiller_;
};

}  // namespace attnserve
