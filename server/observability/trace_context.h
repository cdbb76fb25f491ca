// W3C Trace Context (https://www.w3.org/TR/trace-context/) for one RPC: the client's `traceparent` and
// `tracestate`, parsed and checked, and the server's own span in the same trace. A request without a valid
// traceparent starts a fresh trace, so every request has ids a client can quote and the logs carry.
//
// Wire-free: the service layer reads the metadata (api/call_trace.h) and hands over the strings.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/strings/string_view.h"

namespace attnserve {

// A traceparent header's fields ("00-<trace-id>-<parent-id>-<flags>").
struct Traceparent {
  std::string trace_id;   // 32 lowercase hex digits, not all zeros
  std::string parent_id;  // 16 lowercase hex digits, not all zeros
  uint8_t flags = 0;      // trace-flags (bit 0: sampled)
};

// The version-00 parse of a traceparent value (surrounding blanks ignored): nullopt when malformed (wrong
// length or separators, upper-case or non-hex digits, version ff, all-zero ids). A higher version is read
// by its version-00 prefix, as the specification asks.
std::optional<Traceparent> ParseTraceparent(absl::string_view value);

// The trace of one RPC as the server records it.
struct TraceContext {
  std::string trace_id;        // the client's, or fresh when it sent none that parses
  std::string span_id;         // the server's span for this RPC: 16 hex digits, fresh
  std::string parent_span_id;  // the client's span; empty when the trace is fresh
  uint8_t flags = 0;           // the client's trace-flags; 0 for a fresh trace
  std::string tracestate;      // the client's, when well-formed and <= kMaxTracestateBytes; else empty

  static constexpr size_t kMaxTracestateBytes = 512;

  bool empty() const { return trace_id.empty(); }
  // The traceparent naming the server's span: what the response returns and a downstream call would send.
  std::string ServerTraceparent() const;
};

// The server's span for an RPC whose metadata held `traceparent` and `tracestate` (empty: absent). Thread-
// safe; ids come from a per-thread generator seeded from the OS.
TraceContext StartServerSpan(absl::string_view traceparent, absl::string_view tracestate);

// The trace of the request the calling thread is logging for: the log formatter (startup/logging.h) adds
// its trace_id and span_id to every line written while one is in scope.
class ScopedLogTrace {
 public:
  // `trace` must outlive the scope; an empty trace adds nothing.
  explicit ScopedLogTrace(const TraceContext& trace);
  ~ScopedLogTrace();
  ScopedLogTrace(const ScopedLogTrace&) = delete;
  ScopedLogTrace& operator=(const ScopedLogTrace&) = delete;

  // The innermost scope's trace on this thread; null outside every scope.
  static const TraceContext* Current();

 private:
  const TraceContext* previous_;
};

}  // namespace attnserve
