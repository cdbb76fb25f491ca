#include "server/observability/layer_statistics.h"

namespace attnserve {
namespace {

uint64_t Nanos(absl::Duration d) { return d > absl::ZeroDuration() ? absl::ToInt64Nanoseconds(d) : 0; }

}  // namespace

VersionStatistics& LayerStatistics::EntryLocked(const std::string& layer, int64_t version) {
  VersionStatistics& entry = versions_[{layer, version}];
  entry.layer = layer;
  entry.version = version;
  return entry;
}

void LayerStatistics::RequestDone(const std::string& layer, int64_t version, bool ok, absl::Duration total,
                                  absl::Duration queue, absl::Duration compute, int64_t sequences, absl::Time now) {
  absl::MutexLock lock(&mu_);
  VersionStatistics& entry = EntryLocked(layer, version);
  entry.last_inference = now;
  if (!ok) {
    entry.fail.Add(Nanos(total));
    return;
  }
  entry.success.Add(Nanos(total));
  entry.queue.Add(Nanos(queue));
  entry.compute.Add(Nanos(compute));
  entry.inference_count += static_cast<uint64_t>(sequences);
}

void LayerStatistics::BatchDone(const std::string& layer, int64_t version, int requests, absl::Duration compute) {
  absl::MutexLock lock(&mu_);
  VersionStatistics& entry = EntryLocked(layer, version);
  ++entry.execution_count;
  entry.batches[requests].Add(Nanos(compute));
}

std::vector<VersionStatistics> LayerStatistics::Snapshot(const std::string& layer, int64_t version) const {
  absl::MutexLock lock(&mu_);
  std::vector<VersionStatistics> out;
  for (const auto& [key, entry] : versions_) {
    if (!layer.empty() && key.first != layer) continue;
    if (version != 0 && key.second != version) continue;
    out.push_back(entry);
  }
  return out;
}

}  // namespace attnserve
