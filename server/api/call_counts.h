// attnserve_grpc_calls_total{method, code}: the calls a gRPC server of ours ended, by method and status code,
// those refused before they reach a layer included (authentication, a request that does not parse, an unknown
// layer or method), which attnserve_requests_total does not see.
//
// The methods are a fixed set given at construction; any other path counts as method="other", so that no
// client can grow the label set. Codes are absl's canonical names ("OK", "INVALID_ARGUMENT"), as in
// attnserve_requests_total. A series appears on its first call.
//
// Thread-safety: MethodIndex and Count may be called from any thread (the table is fixed at construction; a
// counter is created once, by prometheus-cpp's locked Family::Add, then read through an atomic pointer).
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/registry.h>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"

namespace attnserve {

class CallCounts {
 public:
  // `method_paths`: gRPC's names of the methods served, "/package.Service/Method"; each is labelled without
  // its leading "/". `registry` must outlive this.
  CallCounts(prometheus::Registry& registry, const std::vector<std::string>& method_paths);
  CallCounts(const CallCounts&) = delete;
  CallCounts& operator=(const CallCounts&) = delete;

  // The index of `path` (gRPC's method name; may be null), or that of "other".
  int MethodIndex(const char* path) const;
  // One more call of method `index` ended with `code` (codes outside absl's count as UNKNOWN).
  void Count(int index, absl::StatusCode code);

 private:
  static constexpr int kCodes = 17;  // absl::StatusCode 0 (OK) to 16 (UNAUTHENTICATED)

  prometheus::Family<prometheus::Counter>& family_;
  std::vector<std::string> labels_;                    // by index; "other" last
  absl::flat_hash_map<std::string_view, int> index_;   // by path; views into paths_
  std::vector<std::string> paths_;
  std::unique_ptr<std::atomic<prometheus::Counter*>[]> counters_;  // [index * kCodes + code]
};

}  // namespace attnserve
