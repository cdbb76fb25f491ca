#include "server/api/call_counts.h"

#include <prometheus/counter.h>

#include "absl/status/status.h"

namespace attnserve {

CallCounts::CallCounts(prometheus::Registry& registry, const std::vector<std::string>& method_paths)
    : family_(prometheus::BuildCounter()
                  .Name("attnserve_grpc_calls_total")
                  .Help("gRPC calls ended, by method and status code, refused ones included")
                  .Register(registry)),
      paths_(method_paths) {
  for (const std::string& path : paths_) {
    if (index_.contains(path)) continue;
    index_.emplace(path, static_cast<int>(labels_.size()));
    labels_.push_back(!path.empty() && path[0] == '/' ? path.substr(1) : path);
  }
  labels_.push_back("other");
  const size_t n = labels_.size() * kCodes;
  counters_ = std::make_unique<std::atomic<prometheus::Counter*>[]>(n);
  for (size_t i = 0; i < n; ++i) counters_[i].store(nullptr, std::memory_order_relaxed);
}

int CallCounts::MethodIndex(const char* path) const {
  if (path != nullptr) {
    const auto it = index_.find(std::string_view(path));
    if (it != index_.end()) return it->second;
  }
  return static_cast<int>(labels_.size()) - 1;
}

void CallCounts::Count(int index, absl::StatusCode code) {
  int c = static_cast<int>(code);
  if (c < 0 || c >= kCodes) c = static_cast<int>(absl::StatusCode::kUnknown);
  std::atomic<prometheus::Counter*>& slot = counters_[static_cast<size_t>(index) * kCodes + c];
  prometheus::Counter* counter = slot.load(std::memory_order_acquire);
  if (counter == nullptr) {
    // Family::Add returns the same counter for the same labels: a race here creates it once.
    counter = &family_.Add({{"method", labels_[static_cast<size_t>(index)]},
                            {"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(c))}});
    slot.store(counter, std::memory_order_release);
  }
  counter->Increment();
}

}  // namespace attnserve
