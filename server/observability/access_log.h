// The access log (--access-log): one JSON line per answered inference request, written by a thread of its
// own so that a slow disk or a blocked stdout never delays a request. Lines wait in a bounded queue; when
// the writer falls that far behind, new lines are dropped and counted (reported in the server log), never
// waited for.
//
// Line (keys in this order; strings escaped, client strings bounded to 128 bytes):
//   {"time":"2026-12-03T04:05:06.789012Z","rpc":"Infer","layer":"small","version":1,"id":"req-7",
//    "code":"OK","request_bytes":4132,"answer_bytes":4096,"total_us":812,"queue_us":140,"compute_us":610,
//    "batch":3,"trace_id":"4bf9...","span_id":"00f0..."}
// answer_bytes counts the answer's tensors (output and attn_weights), 0 for an error.
//
// Thread-safety: Record may be called from any thread at once.
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace attnserve {

struct AccessRecord {
  absl::Time time;          // when the answer was ready
  const char* rpc = "";     // "Infer", "InferStream", "ModelInfer", "Append", ...: a literal
  std::string layer;        // as the client sent it
  int64_t version = 0;      // the version that answered; 0: none was chosen
  std::string id;           // the client's request id
  absl::StatusCode code = absl::StatusCode::kOk;
  int64_t request_bytes = 0;
  int64_t answer_bytes = 0;
  int64_t total_us = 0;     // arrival to answer
  int64_t queue_us = 0;
  int64_t compute_us = 0;
  int32_t batch = 0;        // requests computed together
  std::string trace_id;
  std::string span_id;
};

class AccessLog {
 public:
  struct Options {
    // "-" writes to stdout; anything else is a file, created or appended to.
    std::string path;
    // Lines waiting for the writer; past it, lines are dropped (and counted), never waited for.
    int64_t max_pending_lines = 65536;
    // Tests: where the writer puts each batch of lines instead of `path` (called on the writer thread).
    std::function<void(absl::string_view lines)> write_for_test;
  };
  // INVALID_ARGUMENT for an empty path or max_pending_lines < 1; the file's error when it cannot be opened.
  static absl::StatusOr<std::unique_ptr<AccessLog>> Create(const Options& options);
  // Writes the lines still queued, then stops the writer.
  ~AccessLog();
  AccessLog(const AccessLog&) = delete;
  AccessLog& operator=(const AccessLog&) = delete;

  // Queues the record's line; drops it when max_pending_lines are waiting. Never blocks on I/O.
  void Record(AccessRecord record) ABSL_LOCKS_EXCLUDED(mu_);
  // Lines dropped so far because the writer was behind.
  int64_t dropped() const ABSL_LOCKS_EXCLUDED(mu_);

  // The record's JSON line, newline included.
  static std::string FormatLine(const AccessRecord& record);

 private:
  AccessLog(const Options& options, std::FILE* file);
  void WriterLoop() ABSL_LOCKS_EXCLUDED(mu_);
  void Write(const std::vector<AccessRecord>& records);

  const Options options_;
  std::FILE* const file_;  // null with write_for_test
  mutable absl::Mutex mu_;
  std::vector<AccessRecord> pending_ ABSL_GUARDED_BY(mu_);
  int64_t dropped_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t dropped_reported_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread writer_;
};

}  // namespace attnserve
