#include "server/api/call_trace.h"

#include <map>

namespace attnserve {
namespace {

// The value of a header sent exactly once; empty when absent or repeated (the specification's rule for a
// repeated traceparent).
absl::string_view SingleValue(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata, const char* key) {
  if (metadata.count(key) != 1) return {};
  const grpc::string_ref value = metadata.find(key)->second;
  return absl::string_view(value.data(), value.size());
}

}  // namespace

TraceContext StartTrace(grpc::CallbackServerContext* ctx) {
  const auto& metadata = ctx->client_metadata();
  TraceContext trace = StartServerSpan(SingleValue(metadata, "traceparent"), SingleValue(metadata, "tracestate"));
  ctx->AddInitialMetadata("traceparent", trace.ServerTraceparent());
  if (!trace.tracestate.empty()) ctx->AddInitialMetadata("tracestate", trace.tracestate);
  return trace;
}

}  // namespace attnserve
