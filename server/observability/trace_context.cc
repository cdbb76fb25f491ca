#include "server/observability/trace_context.h"

#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/str_format.h"

namespace attnserve {
namespace {

constexpr size_t kVersion00Length = 55;  // 2 + 1 + 32 + 1 + 16 + 1 + 2

bool IsLowerHex(absl::string_view s) {
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

bool AllZeros(absl::string_view s) { return s.find_first_not_of('0') == absl::string_view::npos; }

int HexValue(char c) { return c <= '9' ? c - '0' : c - 'a' + 10; }

// tracestate: list-members of printable ASCII; the specification's finer grammar is the tracing vendors'
// business, the server only returns and forwards it.
bool IsWellFormedTracestate(absl::string_view s) {
  if (s.empty() || s.size() > TraceContext::kMaxTracestateBytes) return false;
  for (char c : s) {
    if (c < 0x20 || c > 0x7e) return false;
  }
  return true;
}

std::string RandomHex(int bytes) {
  thread_local std::mt19937_64 generator(std::random_device{}());
  std::string hex;
  while (true) {
    hex.clear();
    for (int i = 0; i < bytes; i += 8) absl::StrAppendFormat(&hex, "%016x", generator());
    hex.resize(2 * bytes);
    if (!AllZeros(hex)) return hex;  // all zeros is the specification's invalid id
  }
}

thread_local const TraceContext* current_log_trace = nullptr;

}  // namespace

std::optional<Traceparent> ParseTraceparent(absl::string_view value) {
  value = absl::StripAsciiWhitespace(value);
  if (value.size() < kVersion00Length) return std::nullopt;
  const absl::string_view version = value.substr(0, 2);
  if (!IsLowerHex(version) || version == "ff") return std::nullopt;
  // Version 00 is exactly 55 characters; a later version may append fields after a '-'.
  if (version == "00" ? value.size() != kVersion00Length
                      : value.size() > kVersion00Length && value[kVersion00Length] != '-') {
    return std::nullopt;
  }
  if (value[2] != '-' || value[35] != '-' || value[52] != '-') return std::nullopt;
  Traceparent parsed;
  parsed.trace_id = std::string(value.substr(3, 32));
  parsed.parent_id = std::string(value.substr(36, 16));
  const absl::string_view flags = value.substr(53, 2);
  if (!IsLowerHex(parsed.trace_id) || !IsLowerHex(parsed.parent_id) || !IsLowerHex(flags) ||
      AllZeros(parsed.trace_id) || AllZeros(parsed.parent_id)) {
    return std::nullopt;
  }
  parsed.flags = static_cast<uint8_t>(HexValue(flags[0]) * 16 + HexValue(flags[1]));
  return parsed;
}

std::string TraceContext::ServerTraceparent() const {
  return absl::StrFormat("00-%s-%s-%02x", trace_id, span_id, flags);
}

TraceContext StartServerSpan(absl::string_view traceparent, absl::string_view tracestate) {
  TraceContext trace;
  trace.span_id = RandomHex(8);
  if (std::optional<Traceparent> parent = ParseTraceparent(traceparent)) {
    trace.trace_id = std::move(parent->trace_id);
    trace.parent_span_id = std::move(parent->parent_id);
    trace.flags = parent->flags;
    // tracestate belongs to the trace the client named: without one it is dropped, as the spec asks.
    if (IsWellFormedTracestate(tracestate)) trace.tracestate = std::string(tracestate);
  } else {
    trace.trace_id = RandomHex(16);
  }
  return trace;
}

ScopedLogTrace::ScopedLogTrace(const TraceContext& trace) : previous_(current_log_trace) {
  current_log_trace = trace.empty() ? nullptr : &trace;
}

ScopedLogTrace::~ScopedLogTrace() { current_log_trace = previous_; }

const TraceContext* ScopedLogTrace::Current() { return current_log_trace; }

}  // namespace attnserve
