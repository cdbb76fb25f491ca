#include "server/api/trace_interceptor.h"

#include <map>
#include <string>

namespace attnserve {
namespace {

// The interceptor hands the server span to the handler as a received metadata entry under this key (a
// client's entries of the same name are removed first, so a client cannot choose the server's ids).
constexpr char kServerSpanKey[] = "attnserve-server-span";
// Also carried: the client's span and tracestate, which TraceOf needs for the log and access lines.
constexpr char kParentSpanKey[] = "attnserve-parent-span";
constexpr char kTracestateKey[] = "attnserve-tracestate";

using MetadataMap = std::multimap<grpc::string_ref, grpc::string_ref>;

// The value of a header sent exactly once; empty when absent or repeated (the specification's rule for a
// repeated traceparent).
absl::string_view SingleValue(const MetadataMap& metadata, const char* key) {
  if (metadata.count(key) != 1) return {};
  const grpc::string_ref value = metadata.find(key)->second;
  return absl::string_view(value.data(), value.size());
}

void EraseAll(MetadataMap* metadata, const char* key) {
  auto range = metadata->equal_range(key);
  metadata->erase(range.first, range.second);
}

class TraceInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit TraceInterceptor(grpc::experimental::ServerRpcInfo* info) : info_(info) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::POST_RECV_INITIAL_METADATA)) {
      StartSpan(methods->GetRecvInitialMetadata());
    }
    methods->Proceed();
  }

 private:
  void StartSpan(MetadataMap* metadata) {
    trace_ = StartServerSpan(SingleValue(*metadata, "traceparent"), SingleValue(*metadata, "tracestate"));
    server_traceparent_ = trace_.ServerTraceparent();
    for (const char* key : {kServerSpanKey, kParentSpanKey, kTracestateKey}) EraseAll(metadata, key);
    // string_refs into members: the interceptor lives as long as the call.
    metadata->emplace(kServerSpanKey, server_traceparent_);
    metadata->emplace(kParentSpanKey, trace_.parent_span_id);
    metadata->emplace(kTracestateKey, trace_.tracestate);
    info_->server_context()->AddInitialMetadata("traceparent", server_traceparent_);
    if (!trace_.tracestate.empty()) info_->server_context()->AddInitialMetadata("tracestate", trace_.tracestate);
  }

  grpc::experimental::ServerRpcInfo* info_;
  TraceContext trace_;
  std::string server_traceparent_;
};

}  // namespace

grpc::experimental::Interceptor* TraceInterceptorFactory::CreateServerInterceptor(
    grpc::experimental::ServerRpcInfo* info) {
  return new TraceInterceptor(info);
}

TraceContext TraceOf(const grpc::ServerContextBase& ctx) {
  const MetadataMap& metadata = ctx.client_metadata();
  const std::optional<Traceparent> server_span = ParseTraceparent(SingleValue(metadata, kServerSpanKey));
  if (!server_span) return StartServerSpan({}, {});
  TraceContext trace;
  trace.trace_id = server_span->trace_id;
  trace.span_id = server_span->parent_id;  // the server's span is the parent of what it would call next
  trace.flags = server_span->flags;
  trace.parent_span_id = std::string(SingleValue(metadata, kParentSpanKey));
  trace.tracestate = std::string(SingleValue(metadata, kTracestateKey));
  return trace;
}

}  // namespace attnserve
