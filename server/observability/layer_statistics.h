// Cumulative request and batch statistics per layer version, as the Open Inference Protocol's
// ModelStatistics reports them (Prometheus gets the same events through ServerMetrics; this keeps totals that
// can be read back per version).
//
// Only requests that found their layer are counted, so unknown names sent by a client cannot grow it, and
// each layer keeps its kVersionsKept newest versions (as the Prometheus series do): bounded by the layers
// ever loaded, however often they are reloaded.
//
// Thread-safety: every method may be called from any thread at once.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace attnserve {

struct CountAndNanos {
  uint64_t count = 0;
  uint64_t ns = 0;
  void Add(uint64_t nanos) {
    ++count;
    ns += nanos;
  }
};

struct VersionStatistics {
  std::string layer;
  int64_t version = 0;
  absl::Time last_inference = absl::UnixEpoch();  // when its last request was answered
  uint64_t inference_count = 0;  // sequences answered OK (B per request)
  uint64_t execution_count = 0;  // batches computed
  CountAndNanos success;         // requests answered OK, arrival to answer
  CountAndNanos fail;            // requests that failed after they found the layer
  CountAndNanos queue;           // arrival to the start of the request's batch
  CountAndNanos compute;         // the engine time of the request's batch, per request
  std::map<int, CountAndNanos> batches;  // by batch size: batches and their engine time
};

class LayerStatistics {
 public:
  static constexpr int kVersionsKept = 16;

  // One answered request. `queue` and `compute` are counted only when `ok`.
  void RequestDone(const std::string& layer, int64_t version, bool ok, absl::Duration total, absl::Duration queue,
                   absl::Duration compute, int64_t sequences, absl::Time now) ABSL_LOCKS_EXCLUDED(mu_);
  // One computed batch of `requests` requests.
  void BatchDone(const std::string& layer, int64_t version, int requests, absl::Duration compute)
      ABSL_LOCKS_EXCLUDED(mu_);
  // The versions of `layer` (every layer when empty), restricted to `version` unless it is 0, ordered by
  // layer then version.
  std::vector<VersionStatistics> Snapshot(const std::string& layer, int64_t version) const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  // The entry of (layer, version), added when new; a layer's oldest entry goes past kVersionsKept.
  VersionStatistics& EntryLocked(const std::string& layer, int64_t version) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  std::map<std::pair<std::string, int64_t>, VersionStatistics> versions_ ABSL_GUARDED_BY(mu_);
};

}  // namespace attnserve
